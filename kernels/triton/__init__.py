"""Triton kernels of `lasp_hf.linear_attention`: the chunked op (forward, backward, autograd), the fused
decoding step and the state-only passes sequence parallelism uses (`lasp_hf.parallel.lasp` looks them up
by name). They also run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)."""

from lasp_hf.kernels.triton.chunk import SegmentReuse, chunk_linear_attention
from lasp_hf.kernels.triton.recurrent import recurrent_step
from lasp_hf.kernels.triton.state_only import final_state_only, initial_state_grad_only

__all__ = ["SegmentReuse", "chunk_linear_attention", "final_state_only", "initial_state_grad_only", "recurrent_step"]
