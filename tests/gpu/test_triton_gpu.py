"""The Triton kernels on a GPU at real shapes, against float64 (the chunked algorithm written in the test
helper, independent of the kernels): output, final state and every gradient, NaN-poisoned buffers.

bf16 rule: relative error <= 1e-2, and no worse than twice the error of the PyTorch reference
backend run on the same bf16 inputs for every bf16-rounded result (o, dq, dk, dv) and dh0. The reference
keeps its states and the decay gradient in float32 with no rounding at all (errors ~1e-7), so for
final_state and dg only the 1e-2 bound applies. Errors land in $LASP_HF_TEST_OUT/triton_errors.jsonl
when that variable is set.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lasp_hf
from triton_reference64 import chunked64, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison():
    from lasp_hf.kernels.triton import utils

    utils.POISON_OUTPUTS = True
    yield
    utils.POISON_OUTPUTS = False


def _record(case, errors):
    out = os.environ.get("LASP_HF_TEST_OUT")
    if out:
        with open(os.path.join(out, "triton_errors.jsonl"), "a") as f:
            f.write(json.dumps({"case": case, **errors}) + "\n")


def _inputs(B, T, H, K, V, dtype, g_mode, N):
    dev = "cuda"
    q = torch.randn(B, T, H, K, device=dev, dtype=dtype)
    k = torch.randn(B, T, H, K, device=dev, dtype=dtype) * K ** -0.5
    v = torch.randn(B, T, H, V, device=dev, dtype=dtype)
    if g_mode == "none":
        g = None
    elif g_mode == "head":
        g = -(2.0 ** (-8.0 * torch.arange(1, H + 1, device=dev) / H))   # lightning attention's slopes
    else:
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev) + 4.0) / 4
    h0 = torch.randn(N, H, K, V, device=dev)
    return q, k, v, g, h0


def _run(backend, q, k, v, g, h0, do, dS, cu_seqlens=None, scale=None):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (q, k, v, g, h0)]
    o, final = lasp_hf.linear_attention(*leaves[:4], scale=scale, initial_state=leaves[4], output_final_state=True,
                                        cu_seqlens=cu_seqlens, backend=backend)
    ((o.float() * do).sum() + (final * dS).sum()).backward()
    grads = {name: x.grad for name, x in zip(("dq", "dk", "dv", "dg", "dh0"), leaves) if x is not None}
    return {"o": o, "final_state": final, **grads}


def _reference64(q, k, v, g, h0, do, dS, scale, cu_seqlens=None):
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (q, k, v, g, h0)]
    q64, k64, v64, g64, h064 = leaves
    if cu_seqlens is None:
        o, final = chunked64(q64, k64, v64, g64, scale, h064)
    else:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for n in range(len(bounds) - 1):
            a, b = bounds[n], bounds[n + 1]
            g_n = g64[:, a:b] if (g64 is not None and g64.dim() == 3) else g64
            if a == b:
                finals.append(h064[n:n + 1] * 1)
                continue
            o_n, s_n = chunked64(q64[:, a:b], k64[:, a:b], v64[:, a:b], g_n, scale, h064[n:n + 1])
            outs.append(o_n)
            finals.append(s_n)
        o, final = torch.cat(outs, 1), torch.cat(finals, 0)
    ((o * do.double()).sum() + (final * dS.double()).sum()).backward()
    grads = {name: x.grad for name, x in zip(("dq", "dk", "dv", "dg", "dh0"), leaves) if x is not None}
    return {"o": o, "final_state": final, **grads}


def _check(case, B, T, H, K, V, dtype, g_mode, cu_seqlens=None, compare_torch=True):
    torch.manual_seed(0)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    q, k, v, g, h0 = _inputs(B, T, H, K, V, dtype, g_mode, N)
    g_req = g
    do = torch.randn(B, T, H, V, device="cuda")
    dS = torch.randn(N, H, K, V, device="cuda")
    scale = K ** -0.5
    ours = _run("triton", q, k, v, g_req, h0, do, dS, cu_seqlens)
    ref = _reference64(q, k, v, g_req, h0, do, dS, scale, cu_seqlens)
    errors = {name: rel_err(ours[name], ref[name]) for name in ref}
    torch_errors = {}
    if dtype != torch.float32 and compare_torch:
        base = _run("torch", q, k, v, g_req, h0, do, dS, cu_seqlens)
        torch_errors = {name: rel_err(base[name], ref[name]) for name in ref}
        del base
    _record(case, {"errors": errors, "torch_backend_errors": torch_errors})
    tol = TOL[dtype]
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{case}: over {tol}: {bad}; all {errors}"
    for name in ("o", "dq", "dk", "dv", "dh0"):
        if name in torch_errors:
            assert errors[name] <= 2 * torch_errors[name] + 1e-6, (
                f"{case}: {name} error {errors[name]:.2e} > 2 x torch backend's {torch_errors[name]:.2e}")


@pytest.mark.parametrize("g_mode", ["none", "head", "token"])
def test_small_batch_long_sequence_bf16(g_mode):
    # B*H = 16: the sequence is cut into segments whose states are combined.
    _check(f"bf16 B1 T8209 H16 K128 {g_mode}", 1, 8192 + 17, 16, 128, 128, torch.bfloat16, g_mode)


def test_large_batch_bf16():
    # B*H = 256: one segment per sequence.
    _check("bf16 B8 T4096 H32 K128 head", 8, 4096, 32, 128, 128, torch.bfloat16, "head")


@pytest.mark.parametrize("g_mode", ["head", "token"])
def test_head_dim_256_bf16(g_mode):
    _check(f"bf16 B2 T4099 H4 K256 {g_mode}", 2, 4096 + 3, 4, 256, 256, torch.bfloat16, g_mode)


def test_head_dim_64_fp16():
    _check("fp16 B2 T2049 H4 K64 head", 2, 2048 + 1, 4, 64, 64, torch.float16, "head")


@pytest.mark.parametrize("g_mode", ["none", "token"])
def test_float32(g_mode):
    _check(f"fp32 B1 T4129 H8 K128 {g_mode}", 1, 4096 + 33, 8, 128, 128, torch.float32, g_mode)


def test_dims_not_powers_of_two_fp32():
    _check("fp32 B1 T2000 H4 K48 V80 head", 1, 2000, 4, 48, 80, torch.float32, "head")


@pytest.mark.parametrize("g_mode", ["head", "token"])
def test_packed_sequences_bf16(g_mode):
    lengths = [1, 63, 64, 65, 0, 9000, 130, 4000, 777]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    _check(f"bf16 packed {lengths} H16 K128 {g_mode}", 1, sum(lengths), 16, 128, 128, torch.bfloat16, g_mode,
           cu_seqlens=cu)


@pytest.mark.parametrize("K, H, g_mode", [(128, 16, "head"), (256, 8, "token")])
def test_128k_tokens_bf16(K, H, g_mode):
    _check(f"bf16 B1 T131072 H{H} K{K} {g_mode}", 1, 131072, H, K, K, torch.bfloat16, g_mode,
           compare_torch=(K == 128))


@pytest.mark.parametrize("g_mode", ["none", "head", "batch_head"])
def test_recurrent_step_matches_chunked(g_mode):
    # Decoding token by token after a chunked prefill gives the chunked run's outputs and state.
    torch.manual_seed(0)
    B, T, H, K, V = 4, 70, 8, 128, 128
    q, k, v = (torch.randn(B, T, H, D, device="cuda") for D in (K, K, V))
    g_tok = None if g_mode == "none" else (
        -torch.rand(H, device="cuda").expand(B, T, H).contiguous() if g_mode == "head"
        else -torch.rand(B, T, H, device="cuda"))
    o_ref, s_ref = chunked64(q, k, v, g_tok, K ** -0.5)
    _, state = lasp_hf.linear_attention(q[:, :64], k[:, :64], v[:, :64], None if g_tok is None else g_tok[:, :64],
                                        output_final_state=True, backend="triton")
    for t in range(64, T):
        g_t = None if g_tok is None else (g_tok[0, t] if g_mode == "head" else g_tok[:, t])
        o_t, state = lasp_hf.linear_attention_step(q[:, t], k[:, t], v[:, t], g_t, state=state, backend="triton")
        assert rel_err(o_t, o_ref[:, t]) <= 1e-4
    assert rel_err(state, s_ref) <= 1e-4


def _check_state_only(case, B, T, H, K, V, dtype, g_mode):
    from lasp_hf.kernels import triton as backend
    from lasp_hf.parallel import lasp
    from triton_reference64 import final_state64, initial_state_grad64

    torch.manual_seed(0)
    q, k, v, g, _ = _inputs(B, T, H, K, V, dtype, g_mode, B)
    do = torch.randn(B, T, H, V, device="cuda", dtype=dtype)
    h0 = torch.randn(B, H, K, V, device="cuda")
    scale = K ** -0.5
    ours = {"final_state_only": backend.final_state_only(k, v, g, initial_state=h0),
            "initial_state_grad_only": backend.initial_state_grad_only(q, do, g, scale=scale)}
    torch_path = {"final_state_only": lasp._segment_state(k, v, g, 0, T, h0),
                  "initial_state_grad_only": lasp._carried_state_grad(q, do, g, T, scale)[0]}
    ref = {"final_state_only": final_state64(k, v, g, h0),
           "initial_state_grad_only": initial_state_grad64(q, do, g, scale)}
    errors = {name: rel_err(ours[name], ref[name]) for name in ref}
    torch_errors = {name: rel_err(torch_path[name], ref[name]) for name in ref}
    _record(case, {"errors": errors, "torch_backend_errors": torch_errors})
    for name in ref:
        assert ours[name].dtype == torch.float32 and ours[name].shape == (B, H, K, V)
        assert errors[name] <= TOL[dtype], (case, name, errors[name])
        if dtype != torch.float32:
            # + 1e-5: with g None both are exact bf16 products summed in float32 in different orders.
            assert errors[name] <= 2 * torch_errors[name] + 1e-5, (case, name, errors[name], torch_errors[name])


@pytest.mark.parametrize("g_mode", ["none", "head", "token"])
@pytest.mark.parametrize("B, T, H", [(1, 32768, 16), (2, 4096 + 7, 64)])
def test_state_only_passes_bf16(B, T, H, g_mode):
    # The SP hooks (final_state_only, initial_state_grad_only) at a rank's real shape, against float64 and
    # no worse than twice the op's own PyTorch passes on the same bf16 inputs (which round the decayed
    # k / q to bf16 the same way). B*H = 16: segments folded; B*H = 128: one segment per row.
    _check_state_only(f"state-only bf16 B{B} T{T} H{H} K128 {g_mode}", B, T, H, 128, 128, torch.bfloat16, g_mode)


@pytest.mark.parametrize("K, V, dtype", [(48, 80, torch.float32), (256, 256, torch.bfloat16)])
def test_state_only_passes_other_dims(K, V, dtype):
    # K = 256: two K blocks per program column; K = 48, V = 80: masked tiles, float32 (tf32x3 products).
    _check_state_only(f"state-only {dtype} B1 T4099 H4 K{K} V{V} token", 1, 4096 + 3, 4, K, V, dtype, "token")


def test_cached_launches_match_tritons_own():
    # Packed documents, per-token decay, an initial state and every gradient: each kernel runs through the cached
    # path (after a first call) and through Triton's own, with identical results.
    from lasp_hf.kernels.triton import chunk_kernels, launch

    B, T, H, K, V = 1, 5000, 4, 64, 128
    q, k, v, g, _ = _inputs(B, T, H, K, V, torch.bfloat16, "token", 1)
    cu = torch.tensor([0, 100, 2300, 2301, 5000], device="cuda", dtype=torch.int32)
    h0 = torch.randn(4, H, K, V, device="cuda")
    do = torch.randn_like(v)

    def run():
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, h0)]
        o, final = lasp_hf.linear_attention(*leaves[:4], scale=0.5, initial_state=leaves[4], output_final_state=True,
                                            cu_seqlens=cu, backend="triton")
        grads = torch.autograd.grad([o, final], leaves, [do, torch.ones_like(final)])
        return [o, final, *grads]

    assert launch.ENABLED
    run()  # first launches: Triton's path, filling the caches
    fast = run()
    assert launch.ENABLED, "the cached path turned itself off"
    assert chunk_kernels._fwd_kernel_output.cache and chunk_kernels._bwd_kernel_dq.cache
    launch.ENABLED = False
    try:
        slow = run()
    finally:
        launch.ENABLED = True
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _compiled_variants(kernels) -> dict:
    """Kernels compiled so far for the current device, per kernel of `kernels` (FastLaunch wrappers of JIT
    functions): the first entry of a JITFunction's per-device cache is its compiled-kernel dict (Triton 3.x)."""
    device = torch.cuda.current_device()
    return {kernel.__name__: len(kernel.fn.device_caches[device][0]) for kernel in kernels}


def test_chunks_per_segment_changes_do_not_recompile(monkeypatch):
    """The plan's chunks per segment (and the token counts) change with a packed batch's documents. The kernels
    must not be specialized on them: Triton would compile a variant per class (== 1, divisible by 16, other),
    about a second per kernel in the middle of training, as two slow steps of the first run on a machine."""
    from lasp_hf.kernels.triton import chunk, chunk_kernels

    kernels = [chunk_kernels._fwd_kernel_segment_state, chunk_kernels._kernel_segment_scan,
               chunk_kernels._fwd_kernel_output, chunk_kernels._bwd_kernel_segment_dstate,
               chunk_kernels._bwd_kernel_dk, chunk_kernels._bwd_kernel_dv, chunk_kernels._bwd_kernel_dq]
    B, T, H, K, V = 1, 64 * 48, 2, 64, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for D in (K, K, V))
    k = k * K ** -0.5
    g = -torch.rand(H, device="cuda") * 0.1
    grad_out = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)

    def run(cps):
        monkeypatch.setattr(chunk, "CHUNKS_PER_SEGMENT", cps)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        o, _ = lasp_hf.linear_attention(*leaves, g, backend="triton")
        o.backward(grad_out)
        torch.cuda.synchronize()
        return [o.detach()] + [x.grad for x in leaves]

    first = run(5)  # several segments per sequence: every kernel above runs
    compiled = _compiled_variants(kernels)
    for cps in (1, 16, 7, 48):
        results = run(cps)
        now = _compiled_variants(kernels)
        assert now == compiled, f"chunks per segment {cps} compiled new kernel variants: {compiled} -> {now}"
        for name, got, want in zip(("o", "dq", "dk", "dv"), results, first, strict=True):
            assert rel_err(got, want) <= 1e-2, (cps, name, rel_err(got, want))
