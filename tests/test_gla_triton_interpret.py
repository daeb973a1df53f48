"""The per-key-channel decay (GLA) Triton kernels on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1),
against a float64 token-by-token recurrence: output, final state and every gradient (q, k, v, g, initial_state),
strong decays (g down to -5 per token) and restarts (g = -inf), odd lengths, segments, several K / V blocks,
packed sequences, the state-only passes and the decoding step.

As in test_triton_interpret.py, the kernel tests run in a subprocess started with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import lasp_hf
from gla_reference64 import gla_recurrence64, packed_gla_recurrence64
from interpreter_harness import needs_interpreter, outside_interpreter, run_in_interpreter_subprocess
from triton_reference64 import rel_err


# float32 through the interpreter is numpy float32 (~1e-6); the project's float32 bound is 1e-4. bfloat16 inputs: 1e-2.
TOL_FP32 = 1e-4
TOL_BF16 = 1e-2


@outside_interpreter
def test_in_interpreter_subprocess():
    run_in_interpreter_subprocess(__file__)


@pytest.fixture
def kernels():
    from lasp_hf.kernels.triton import chunk, gla_chunk, utils

    utils.POISON_OUTPUTS = True
    configs = dict(gla_chunk.CONFIGS)
    yield gla_chunk
    utils.POISON_OUTPUTS = False
    chunk.CHUNKS_PER_SEGMENT = None
    gla_chunk.CONFIGS.update(configs)


def decays(B, T, H, K, strength, restarts=(), gen=None):
    """g [B, T, H, K]: uniform in [-strength, 0] with -inf at the (b, t, h, channels) in `restarts`."""
    g = -strength * torch.rand(B, T, H, K, generator=gen)
    for b, t, h, channels in restarts:
        g[b, t, h, channels] = float("-inf")
    return g


def check(B, T, H, K, V, g, *, dtype=torch.float32, use_h0=True, use_final=True, cu_seqlens=None, g_grad=True,
          tol=TOL_FP32):
    q, k, v = (torch.randn(B, T, H, D).to(dtype) for D in (K, K, V))
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    h0 = torch.randn(N, H, K, V) if use_h0 else None
    scale = K ** -0.5
    leaves = [x.detach().clone().requires_grad_(x is not g or g_grad) if x is not None else None
              for x in (q, k, v, g, h0)]
    o, final = lasp_hf.linear_attention(*leaves[:4], scale=scale, initial_state=leaves[4],
                                        output_final_state=use_final, cu_seqlens=cu_seqlens, backend="triton")
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    do, dS = torch.randn(B, T, H, V, dtype=torch.float64), torch.randn(N, H, K, V, dtype=torch.float64)
    ((o.double() * do).sum() + ((final.double() * dS).sum() if use_final else 0)).backward()

    ref = [x.detach().double().requires_grad_(x is not g or g_grad) if x is not None else None
           for x in (q, k, v, g, h0)]
    if cu_seqlens is None:
        o64, s64 = gla_recurrence64(*ref[:4], scale, ref[4])
    else:
        o64, s64 = packed_gla_recurrence64(*ref[:4], scale, ref[4], cu_seqlens)
    ((o64 * do).sum() + ((s64 * dS).sum() if use_final else 0)).backward()

    errors = {"o": rel_err(o, o64)}
    if use_final:
        assert final.dtype == torch.float32
        errors["final_state"] = rel_err(final, s64)
    else:
        assert final is None
    for name, x, x64 in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, ref):
        if x is None or not x.requires_grad:
            continue
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype, name
        errors[name] = rel_err(x.grad, x64.grad)
    if not g_grad:
        assert leaves[3].grad is None
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errors})"
    return errors


@needs_interpreter
@pytest.mark.parametrize("step_tokens", [16, 32])
def test_strong_decay_restarts_segments_and_blocks(kernels, monkeypatch, step_tokens):
    """T = 65 (a one-token last chunk), one-chunk segments (the segment-state, segment-scan and local-dS kernels
    run), small state tiles (2 V blocks in the forward and dv, 2 K blocks in dq / dk), decays down to -5 per
    token (the decay over a 16-token step reaches e^-80) and restarts of some channels, on a step's first token
    and mid-step."""
    kernels.CONFIGS.update(fwd=(512, 4, 2), dv=(512, 4, 2), bwd=(512, 4, 2))
    monkeypatch.setattr(kernels, "STEP_TOKENS", step_tokens)  # 32: a step holds a restart and a mild part
    from lasp_hf.kernels.triton import chunk

    chunk.CHUNKS_PER_SEGMENT = 1
    g = decays(2, 65, 1, 32, 5.0, restarts=[(0, 16, 0, slice(0, 5)), (1, 40, 0, [3, 31]), (0, 64, 0, 7)])
    check(2, 65, 1, 32, 32, g)


@needs_interpreter
@pytest.mark.parametrize("step_tokens", [16, 32])
def test_mild_decays_take_the_tensor_core_form(kernels, monkeypatch, step_tokens):
    """Steps without restarts whose decay stays within FACTORED_SPAN form their intra-step products as
    (q exp(b)) (k exp(-b))^T in every kernel: the elementwise form's row walk (`_next_row_decay`) must not run,
    and the results still match float64 (several segments, 2 K blocks in dq / dk)."""
    from lasp_hf.kernels.triton import chunk, gla_kernels

    def elementwise_form(*args, **kwargs):
        raise AssertionError("the elementwise intra-step form ran for a factorizable step")

    monkeypatch.setattr(gla_kernels, "_next_row_decay", elementwise_form)
    monkeypatch.setattr(kernels, "STEP_TOKENS", step_tokens)
    kernels.CONFIGS.update(bwd=(512, 4, 2))
    chunk.CHUNKS_PER_SEGMENT = 1
    check(2, 70, 2, 32, 16, decays(2, 70, 2, 32, 1.0))  # at most 32 over a 32-token step


@needs_interpreter
def test_elementwise_form_alone(kernels, monkeypatch):
    """With the tensor-core form off (FACTORED_SPAN < 0) every step takes the elementwise form: mild and strong
    decays and restarts against float64."""
    from lasp_hf.kernels.triton import chunk

    monkeypatch.setattr(kernels, "FACTORED_SPAN", -1.0)
    chunk.CHUNKS_PER_SEGMENT = 1
    g = decays(1, 50, 2, 16, 5.0, restarts=[(0, 20, 1, slice(0, 3))])
    g[:, :16] *= 0.01  # the first step mild
    check(1, 50, 2, 16, 16, g)


@needs_interpreter
def test_packed_sequences(kernels):
    # An empty sequence, a one-token sequence, sequences ending mid-step and on a segment boundary; a restart.
    from lasp_hf.kernels.triton import chunk

    chunk.CHUNKS_PER_SEGMENT = 1
    cu_seqlens = torch.tensor([0, 0, 1, 64, 97], dtype=torch.int32)
    g = decays(1, 97, 2, 16, 1.0, restarts=[(0, 70, 1, slice(2, 9))])
    check(1, 97, 2, 16, 16, g, cu_seqlens=cu_seqlens)


@needs_interpreter
@pytest.mark.parametrize("T", [1, 17])
def test_short_without_states_and_constant_decay(kernels, T):
    check(1, T, 2, 16, 16, decays(1, T, 2, 16, 0.5), use_h0=False, use_final=False, g_grad=False)


@needs_interpreter
def test_bfloat16_inputs(kernels):
    g = decays(1, 40, 2, 16, 0.5, restarts=[(0, 20, 0, slice(0, 4))])
    check(1, 40, 2, 16, 32, g, dtype=torch.bfloat16, tol=TOL_BF16)


@needs_interpreter
def test_float16_inputs_in_the_tensor_core_form(kernels):
    # Steps decaying by up to ~30 take the tensor-core form, whose factors reach e^30 times k: float16 (max 65504)
    # cannot hold them, so those products take bfloat16 operands (float32 in the interpreter); float16 would
    # give inf here.
    check(1, 48, 2, 16, 16, decays(1, 48, 2, 16, 2.0), dtype=torch.float16, tol=3e-3)


@needs_interpreter
def test_state_only_passes(kernels):
    """What sequence parallelism uses: the state after all tokens from h0, and dL/dh0 of sum(o * do)."""
    from lasp_hf.kernels.triton import chunk

    chunk.CHUNKS_PER_SEGMENT = 1
    B, T, H, K, V = 2, 70, 1, 16, 32
    q, k, v, do = (torch.randn(B, T, H, D) for D in (K, K, V, V))
    g = decays(B, T, H, K, 2.0, restarts=[(1, 10, 0, slice(0, 8))])
    h0 = torch.randn(B, H, K, V)
    final = kernels.final_state_only(k, v, g, initial_state=h0)
    dh0 = kernels.initial_state_grad_only(q, do, g, scale=0.5)
    h064 = h0.double().requires_grad_()
    o64, s64 = gla_recurrence64(q, k, v, g, 0.5, h064)
    (o64 * do.double()).sum().backward()
    assert rel_err(final, s64) <= TOL_FP32
    assert rel_err(dh0, h064.grad) <= TOL_FP32


@needs_interpreter
def test_decoding_step_matches_the_recurrence(kernels):
    B, H, K, V, T = 2, 2, 16, 32, 3
    q, k, v = (torch.randn(B, T, H, D) for D in (K, K, V))
    g = decays(B, T, H, K, 3.0, restarts=[(0, 1, 1, slice(0, 6))])
    o64, s64 = gla_recurrence64(q, k, v, g, K ** -0.5)
    state = None
    for t in range(T):
        o, state = lasp_hf.linear_attention_step(q[:, t], k[:, t], v[:, t], g[:, t], state=state, backend="triton")
        assert rel_err(o, o64[:, t]) <= TOL_FP32
    assert rel_err(state, s64) <= TOL_FP32


@needs_interpreter
def test_segment_reuse_for_sequence_parallelism(kernels):
    """`SegmentReuse` as sequence parallelism drives it: the state-only results computed before the op (the state
    handed on, the gradient of the received state), then taken by the op's forward and backward; every result
    against float64."""
    from lasp_hf.kernels.triton import chunk

    chunk.CHUNKS_PER_SEGMENT = 1
    B, T, H, K, V = 1, 70, 1, 16, 16
    q, k, v, do = (torch.randn(B, T, H, D) for D in (K, K, V, V))
    g = decays(B, T, H, K, 2.0, restarts=[(0, 30, 0, slice(0, 5))])
    h0, dS = torch.randn(B, H, K, V), torch.randn(B, H, K, V)
    scale = K ** -0.5
    reuse = kernels.SegmentReuse.make(q, k, v, g, accurate_states=True)
    assert reuse is not None
    handed_on = reuse.final_state(k, v, g, h0)
    o, final, saved, info = kernels.local_forward(q, k, v, g, scale=scale, initial_state=h0, need_final=True,
                                                  need_dg=True, reuse=reuse)
    assert reuse.segment_states is None  # taken by the forward
    received_grad = reuse.initial_state_grad(q, do, g, scale)
    dq, dk, dv, dg, dh0 = kernels.local_backward(saved, info, do, dS, need_dh0=True)
    assert reuse.segment_dstates is None  # taken by the backward

    ref = [x.double().requires_grad_() for x in (q, k, v, g, h0)]
    o64, s64 = gla_recurrence64(*ref[:4], scale, ref[4])
    ((o64 * do.double()).sum() + (s64 * dS.double()).sum()).backward()
    h0_only = h0.double().requires_grad_()
    (gla_recurrence64(q, k, v, g, scale, h0_only)[0] * do.double()).sum().backward()
    pairs = [("handed_on", handed_on, s64), ("o", o, o64), ("final", final, s64),
             ("received_grad", received_grad, h0_only.grad), ("dq", dq, ref[0].grad), ("dk", dk, ref[1].grad),
             ("dv", dv, ref[2].grad), ("dg", dg, ref[3].grad), ("dh0", dh0, ref[4].grad)]
    errors = {name: rel_err(got, want.detach()) for name, got, want in pairs}
    assert all(err <= TOL_FP32 for err in errors.values()), errors
