"""The PyTorch reference of linear attention with a decay per key channel (g [B, T, H, K], GLA) against a float64
token-by-token recurrence: output, final state and every gradient, odd lengths, packed sequences, strong decays
and restarts (g = -inf); the decoding step; the op's input checks for the new shapes."""

from __future__ import annotations

import pytest
import torch
from gla_reference64 import gla_recurrence64, packed_gla_recurrence64
from lasp_hf import linear_attention, linear_attention_step
from triton_reference64 import rel_err

TOL = 1e-4  # float32 states and inputs against float64


def _case(B, T, H, K, V, strength, cu_seqlens=None, restarts=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for D in (K, K, V))
    g = -strength * torch.rand(B, T, H, K, generator=gen)
    if restarts:
        g[0, T // 2, 0, : K // 2] = float("-inf")
        g[-1, T - 1, -1, 0] = float("-inf")
        g[0, 0, -1, 1] = float("-inf")
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    h0 = torch.randn(N, H, K, V, generator=gen)
    return q, k, v, g, h0


def _errors(q, k, v, g, h0, cu_seqlens=None):
    scale = q.shape[-1] ** -0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, final = linear_attention(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                cu_seqlens=cu_seqlens, backend="torch")
    do, dS = torch.randn_like(o, dtype=torch.float64), torch.randn_like(final, dtype=torch.float64)
    ((o.double() * do).sum() + (final.double() * dS).sum()).backward()
    ref = [x.double().requires_grad_() for x in (q, k, v, g, h0)]
    if cu_seqlens is None:
        o64, s64 = gla_recurrence64(*ref[:4], scale, ref[4])
    else:
        o64, s64 = packed_gla_recurrence64(*ref[:4], scale, ref[4], cu_seqlens)
    ((o64 * do).sum() + (s64 * dS).sum()).backward()
    errors = {"o": rel_err(o, o64), "final": rel_err(final, s64)}
    for name, x, x64 in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, ref):
        errors[name] = rel_err(x.grad, x64.grad)
    return errors


@pytest.mark.parametrize("T", [1, 15, 17, 63, 65, 200])
def test_dense_against_float64(T):
    errors = _errors(*_case(2, T, 2, 16, 24, 0.5))
    assert all(err <= TOL for err in errors.values()), errors


def test_strong_decay_against_float64():
    """g down to -5 per token: exp(-cumsum) over a chunk would be e^80 and more; the reference never forms it."""
    errors = _errors(*_case(1, 130, 2, 32, 16, 5.0))
    assert all(err <= TOL for err in errors.values()), errors


def test_packed_against_float64():
    cu = torch.tensor([0, 0, 1, 40, 97, 130], dtype=torch.int32)
    errors = _errors(*_case(1, 130, 2, 16, 16, 1.0, cu_seqlens=cu), cu_seqlens=cu)
    assert all(err <= TOL for err in errors.values()), errors


def test_restart_forgets_the_channel_exactly():
    """g = -inf on every channel at token t: the output from t on equals a fresh run from t, bit for bit in what
    the past could leak (the earlier tokens get huge values that would show)."""
    q, k, v, g, _ = _case(1, 40, 1, 16, 16, 0.5, restarts=False)
    k_loud = k.clone()
    k_loud[:, :20] *= 1e6
    g[:, 20] = float("-inf")
    o, _ = linear_attention(q, k_loud, v, g, backend="torch")
    o_fresh, _ = linear_attention(q[:, 20:], k[:, 20:], v[:, 20:], g[:, 20:], backend="torch")
    assert rel_err(o[:, 20:], o_fresh) <= TOL


def test_decoding_step_against_float64():
    q, k, v, g, _ = _case(2, 5, 2, 16, 8, 2.0)
    o64, s64 = gla_recurrence64(q, k, v, g, 16 ** -0.5)
    state = None
    for t in range(5):
        o, state = linear_attention_step(q[:, t], k[:, t], v[:, t], g[:, t], state=state, backend="torch")
        assert rel_err(o, o64[:, t]) <= TOL
    assert rel_err(state, s64) <= TOL


def test_decay_shapes_are_checked():
    q = torch.randn(1, 4, 2, 16)
    v = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"\[B, T, H, K\]"):
        linear_attention(q, q, v, torch.zeros(1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"\[B, H, K\]"):
        linear_attention_step(q[:, 0], q[:, 0], v[:, 0], torch.zeros(1, 2, 8))
