"""The per-key-channel (GLA) Triton kernels compile for an H100 (sm_90) at the benchmark's shapes (bf16, K = V = 128,
the launchers' block sizes and warps), without a GPU: Triton's own compiler and ptxas. The interpreter tests check
the kernels' arithmetic; this checks what only the compiler sees (layouts, dot shapes, register allocation)."""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

from sm90_compile import SM90_SHARED_BYTES, compile_for_sm90  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles, does not interpret")


def test_gla_kernels_compile_for_sm90():
    import triton.language as tl
    from lasp_hf.kernels.triton import gla_chunk
    from lasp_hf.kernels.triton import gla_kernels as kernels

    base = dict(H=16, K=128, V=128, BT=gla_chunk.STEP_TOKENS, DT=tl.bfloat16, DOT_PREC="tf32", DYN_LOOP=True)
    span = dict(SPAN=gla_chunk.FACTORED_SPAN, IDT=tl.bfloat16)
    state = dict(base, BT=gla_chunk.STATE_STEP_TOKENS)  # the segment-state passes' longer steps
    fwd_bk, fwd_bv = gla_chunk._blocks_v(128, 128, "fwd")
    dv_bk, dv_bv = gla_chunk._blocks_v(128, 128, "dv")
    bwd_bk, bwd_bv = gla_chunk._blocks_k(128, 128, "bwd")
    warps = {phase: config[1] for phase, config in gla_chunk.CONFIGS.items()}
    cases = [
        (kernels.gla_fwd_kernel_output, dict(base, **span, BK=fwd_bk, BV=fwd_bv, SPLIT=True, SPLIT_STATE=True),
         warps["fwd"]),
        (kernels.gla_fwd_kernel_segment_state, dict(state, BK=128, BV=64, SPLIT=False, NV=2), warps["state"]),
        (kernels.gla_fwd_kernel_segment_state, dict(state, BK=fwd_bk, BV=fwd_bv, SPLIT=False, NV=1), warps["fwd"]),
        (kernels.gla_bwd_kernel_segment_dstate, dict(state, BK=128, BV=64, SPLIT=True, NV=2, STORE_DECAY=True),
         warps["bwd"]),
        (kernels.gla_bwd_kernel_dv, dict(base, **span, BK=dv_bk, BV=dv_bv, SPLIT_STATE=True), warps["dv"]),
        (kernels.gla_bwd_kernel_dk,
         dict(base, **span, BK=bwd_bk, BV=bwd_bv, SPLIT=True, NEED_DG=True, STORE_START=True), warps["bwd"]),
        (kernels.gla_bwd_kernel_dq, dict(base, **span, BK=bwd_bk, BV=bwd_bv, SPLIT=True, NEED_DG=True), warps["bwd"]),
        (kernels.gla_bwd_kernel_dg_carry, dict(H=16, K=128, BT=gla_chunk.STEP_TOKENS, BK=bwd_bk, DYN_LOOP=True),
         warps["bwd"]),
        (kernels.gla_kernel_segment_scan, dict(H=16, K=128, V=128, BLOCK=512, HAS_START=True, STORE_EACH=True,
                                               STORE_END=True, REVERSE=True), warps["scan"]),
    ]
    # float16 inputs: the intra-step products of the tensor-core form take bfloat16 operands (gla_chunk._intra_meta)
    half = dict(base, **span, DT=tl.float16, BK=fwd_bk, BV=fwd_bv, SPLIT=True, SPLIT_STATE=True)
    cases.append((kernels.gla_fwd_kernel_output, half, warps["fwd"]))
    for kernel, constexprs, num_warps in cases:
        tokens = "*fp16" if constexprs.get("DT") == tl.float16 else "*bf16"
        compiled = compile_for_sm90(kernel, constexprs, num_warps, tokens=tokens)
        name = getattr(getattr(kernel, "fn", kernel), "__name__", kernel)
        assert compiled.asm.get("cubin"), name
        assert compiled.metadata.shared <= SM90_SHARED_BYTES, (name, compiled.metadata.shared)
