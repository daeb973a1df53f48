"""Compile a Triton kernel for an H100 / H200 (sm_90) without a GPU (Triton's compiler and ptxas): what only the
compiler sees (layouts, dot shapes, registers, shared memory), which the interpreter tests cannot check."""

from __future__ import annotations

import pytest

SM90_SHARED_BYTES = 232448  # the opt-in shared memory per block of sm_90 (cudaDevAttrMaxSharedMemoryPerBlockOptin)
_INDEX_POINTERS = {"seg_bos", "seg_eos", "seq_first_seg", "seq_num_segs"}
_TOKEN_TENSORS = {"q", "k", "v", "o", "do", "dq", "dk", "dv"}
_SCALARS = {"scale": "fp32", "CPS": "i32", "NUM_TOKENS": "i32", "MAX_SEGS": "i32"}


def compile_for_sm90(kernel, constexprs: dict, num_warps: int, num_stages: int = 2, tokens: str = "*bf16",
                     types: dict | None = None):
    """`kernel` (a `@triton.jit` function or its `launch.fast` wrapper) compiled for sm_90 with `constexprs`;
    token tensors have element type `tokens`, other pointers float32, `types` any argument's type by name
    ("i32", "*bf16", ...). Skips the test where this Triton cannot compile ahead of time."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ASTSource / GPUTarget")
    fn = getattr(kernel, "fn", kernel)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INDEX_POINTERS:
            signature[name] = "*i32"
        elif types and name in types:
            signature[name] = types[name]
        else:
            signature[name] = _SCALARS.get(name) or (tokens if name in _TOKEN_TENSORS else "*fp32")
    source = ASTSource(fn, signature, {n: v for n, v in constexprs.items() if n in fn.arg_names})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
