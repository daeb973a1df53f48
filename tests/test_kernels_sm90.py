"""The per-head / per-token kernels compile for an H100 / H200 (sm_90) at the launchers' settings for the
benchmark's shapes (bf16 and float32, K = V = 128, every decay mode), and each fits the chip's shared memory:
what only Triton's compiler sees (layouts, staging buffers), without a GPU. The interpreter tests check the
arithmetic; a kernel that needs more than 227 KB of shared memory fails only at its first launch on the GPU."""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from sm90_compile import SM90_SHARED_BYTES, compile_for_sm90  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles, does not interpret")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("g_mode", [0, 1, 2])
def test_chunk_kernels_fit_sm90_shared_memory(g_mode, dtype):
    from lasp_hf.kernels.triton import chunk
    from lasp_hf.kernels.triton import chunk_kernels as kernels

    K = V = 128
    cases = [
        ("fwd", kernels._fwd_kernel_output, {}),
        ("fwd_state", kernels._fwd_kernel_segment_state, {"NV": 1}),
        ("bwd_state", kernels._bwd_kernel_segment_dstate, {"NV": 2, "STORE_DECAY": True}),
        ("bwd", kernels._bwd_kernel_dk, {"NEED_DG": g_mode == 2, "STORE_START": True}),
        ("bwd", kernels._bwd_kernel_dq, {"NEED_DG": g_mode == 2}),
        ("bwd", kernels._bwd_kernel_dv, {}),
    ]
    pointer = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    for phase, kernel, extra in cases:
        _, cfg, _, scan = chunk._setup_for(phase, chunk.CONFIGS[phase], dtype, 16, K, V, g_mode, True, False,
                                           chunk.FP32_DOT_PRECISION)
        constexprs = dict(scan, DYN_LOOP=True, **extra)
        compiled = compile_for_sm90(kernel, constexprs, cfg["num_warps"], cfg["num_stages"], pointer)
        name = getattr(getattr(kernel, "fn", kernel), "__name__", phase)
        assert compiled.metadata.shared <= SM90_SHARED_BYTES, (
            f"{name} ({phase}, G_MODE {g_mode}, {dtype}) needs {compiled.metadata.shared} bytes of shared memory; "
            f"sm_90 has {SM90_SHARED_BYTES}")


@pytest.mark.parametrize("M", [1, 32, 64])
def test_decode_kernel_compiles_for_sm90(M):
    """The fused decoding projections at tnl-1b's shapes (hidden 2048, GLU 5632) and the launcher's tiles compile
    for sm_90 and fit its shared memory (ptxas -v on these: 40 - 254 registers at 4 warps, no spills)."""
    from lasp_hf.kernels.triton import decode

    ints = {name: "i32" for name in ("M", "D", "N0", "N1", "N2", "N3", "NB0", "NB1", "NB2")}
    types = {**ints, "eps": "fp32", **{name: "*bf16" for name in ("x", "gate", "norm_w", "residual")},
             **{f"{p}{i}": "*bf16" for p in "wy" for i in range(4)}}
    cases = [  # (D, rows, acts, glu, norm group, norm weight, gate, residual)
        (2048, [2048] * 4, ["silu", "silu", "identity", "identity"], False, None, False, False, False),
        (2048, [2048], ["identity"], False, None, False, True, True),
        (2048, [5632, 5632], ["identity", "identity"], True, None, False, False, False),
        (5632, [2048], ["identity"], False, None, False, False, True),
        (4096, [2048], ["identity"], False, 256, True, True, True),
    ]
    for D, rows, acts, glu, group, norm_weight, gate, residual in cases:
        meta, _ = decode.launch_meta(M, D, rows, acts, glu, group, torch.bfloat16, norm=D != 5632,
                                     norm_weight=norm_weight, gate=gate, residual=residual)
        compiled = compile_for_sm90(decode._kernel, meta, decode.NUM_WARPS, decode.NUM_STAGES,
                                    types=types)
        assert compiled.asm["cubin"] and compiled.metadata.shared <= SM90_SHARED_BYTES, meta
