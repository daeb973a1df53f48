"""The per-head / per-token kernels compile for an H100 / H200 (sm_90) at the launchers' settings for the
benchmark's shapes (bf16 and float32, K = V = 128, every decay mode), and each fits the chip's shared memory:
what only Triton's compiler sees (layouts, staging buffers), without a GPU. The interpreter tests check the
arithmetic; a kernel that needs more than 227 KB of shared memory fails only at its first launch on the GPU."""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles, does not interpret")

SM90_SHARED_BYTES = 232448  # the opt-in shared memory per block of sm_90 (cudaDevAttrMaxSharedMemoryPerBlockOptin)


def _compile(kernel, constexprs: dict, num_warps: int, num_stages: int, dtype: str):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernel, "fn", kernel)  # (the launch wrapper of `launch.fast`)
    pointers = {"seg_bos": "*i32", "seg_eos": "*i32"}
    tokens = {"q", "k", "v", "o", "do", "dq", "dk", "dv"}
    scalars = {"scale": "fp32", "CPS": "i32", "NUM_TOKENS": "i32"}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = scalars.get(name) or pointers.get(name) or (dtype if name in tokens else "*fp32")
    source = ASTSource(fn, signature, {n: v for n, v in constexprs.items() if n in fn.arg_names})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("g_mode", [0, 1, 2])
def test_chunk_kernels_fit_sm90_shared_memory(g_mode, dtype):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource / GPUTarget")
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
        compiled = _compile(kernel, constexprs, cfg["num_warps"], cfg["num_stages"], pointer)
        name = getattr(getattr(kernel, "fn", kernel), "__name__", phase)
        assert compiled.metadata.shared <= SM90_SHARED_BYTES, (
            f"{name} ({phase}, G_MODE {g_mode}, {dtype}) needs {compiled.metadata.shared} bytes of shared memory; "
            f"sm_90 has {SM90_SHARED_BYTES}")
