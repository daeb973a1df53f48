"""LASP with a decay per key channel (g [B, T, H, K], GLA) under gloo (W = 2, 3, 4 CPU processes) against the
single-process op on the whole sequence: o, final_state and every gradient, ring and all-gather, dense rows and
packed documents crossing the cuts, restarts (g = -inf) on and next to a cut.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
import torch.distributed as dist
from distributed_utils import relative_error, run_distributed
from lasp_hf import SequenceParallelContext, linear_attention
from test_sp_linear_attention import LOCAL_LENS, MODES, TOL, _grads, _layouts

H, K, V = 2, 8, 6


def _inputs(W, L, bounds, seed, dims=(H, K, V)):
    H, K, V = dims
    gen = torch.Generator().manual_seed(seed)
    B = 1 if bounds is not None else 2
    T = W * L
    N = len(bounds) - 1 if bounds is not None else B
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=gen) + 2.0)
    # Restarts of single channels: on the first token of rank 1 (a cut) and two tokens before it.
    g[0, L, 0, : K // 2] = float("-inf")
    g[-1, max(L - 2, 0), -1, 1] = float("-inf")
    h0 = torch.randn(N, H, K, V, generator=gen)
    w_o, w_final = torch.randn(B, T, H, V, generator=gen), torch.randn(N, H, K, V, generator=gen)
    cu = torch.tensor(bounds, dtype=torch.int32) if bounds is not None else None
    return q, k, v, g, h0, w_o, w_final, cu


def _gla_worker(W: int, backend: str = "torch", layouts=None, dims=(H, K, V), lens=None) -> dict:
    """Runs on every rank; returns {case: {quantity: relative error}} against the unsharded PyTorch op."""
    rank = dist.get_rank()
    sp = SequenceParallelContext.from_group(dist.group.WORLD)
    errors = {}
    for L in lens or LOCAL_LENS[W]:
        mine = slice(rank * L, (rank + 1) * L)
        for layout, bounds in _layouts(W, L).items():
            if layouts is not None and layout not in layouts:
                continue
            q, k, v, g, h0, w_o, w_final, cu = _inputs(W, L, bounds, zlib.crc32(f"{W}{L}{layout}".encode()), dims)
            leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
            o_ref, final_ref = linear_attention(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                                cu_seqlens=cu, backend="torch")
            ref_grads = _grads((o_ref * w_o).sum() + (final_ref * w_final).sum(), leaves)
            for mode in MODES:
                local = [x[:, mine].clone().requires_grad_() for x in (q, k, v, g)] + [h0.clone().requires_grad_()]
                o, final = linear_attention(*local[:4], initial_state=local[4], output_final_state=True,
                                            cu_seqlens=cu, sp_group=sp, sp_mode=mode, backend=backend)
                share = (rank + 1) / (W * (W + 1) / 2)  # each rank weighs final_state differently
                grads = _grads((o * w_o[:, mine]).sum() + share * (final * w_final).sum(), local)
                dist.all_reduce(grads[4])  # initial_state is passed whole by every rank: summed as DDP would
                case = errors.setdefault(f"L={L}/{layout}/{mode}", {})
                case["o"] = relative_error(o, o_ref[:, mine])
                case["final"] = relative_error(final, final_ref)
                for name, got, ref in zip(("dq", "dk", "dv", "dg", "dh0"), grads, ref_grads):
                    case[name] = relative_error(got, ref if name == "dh0" else ref[:, mine])
    return errors


@functools.cache
def _run(W: int) -> list:
    return run_distributed(_gla_worker, W, W)


def _failures(results) -> list:
    return [f"rank {rank} {case} {name}: {err:.2e}" for rank, errors in enumerate(results)
            for case, quantities in errors.items() for name, err in quantities.items() if not err <= TOL]


@pytest.mark.distributed
@pytest.mark.parametrize("W", [2, 3, 4])
def test_sp_gla_matches_unsharded(W):
    results = _run(W)
    assert not _failures(results), "\n".join(_failures(results))
    assert len(results[0]) == len(LOCAL_LENS[W]) * 5 * len(MODES)
    for quantities in results[0].values():
        assert set(quantities) == {"o", "final", "dq", "dk", "dv", "dg", "dh0"}


@pytest.mark.distributed
def test_sp_gla_triton_local_pass():
    """The per-channel Triton kernels (local pass, state-only passes) in Triton's interpreter, W = 2."""
    pytest.importorskip("triton")
    results = run_distributed(_gla_worker, 2, 2, "triton", ("span",), (1, 16, 16), (40,),
                              start_method="spawn", env={"TRITON_INTERPRET": "1"}, timeout_s=600)
    assert not _failures(results), "\n".join(_failures(results))
    assert len(results[0]) == len(MODES)
