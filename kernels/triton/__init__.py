"""Triton kernels of `lasp_hf.linear_attention`: the chunked op (forward, backward, autograd) and the
fused decoding step. They also run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)."""

from lasp_hf.kernels.triton.chunk import chunk_linear_attention
from lasp_hf.kernels.triton.recurrent import recurrent_step

__all__ = ["chunk_linear_attention", "recurrent_step"]
