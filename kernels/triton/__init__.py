"""Triton kernels of `lasp_hf.linear_attention`: the chunked op (forward, backward, autograd), the fused
decoding step, and what sequence parallelism uses (`lasp_hf.parallel.lasp` looks them up by name): the
state-only passes, the per-segment reuse and the forward / backward without autograd (`local_forward`,
`local_backward`). They also run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1).
A decay per key channel (g [B, T, H, K], GLA) has its own kernels and the same entry points in `gla_chunk`."""

from lasp_hf.kernels.triton.chunk import SegmentReuse, chunk_linear_attention, local_backward, local_forward
from lasp_hf.kernels.triton.recurrent import recurrent_step
from lasp_hf.kernels.triton.state_only import final_state_only, initial_state_grad_only

__all__ = ["SegmentReuse", "chunk_linear_attention", "final_state_only", "initial_state_grad_only", "local_backward",
           "local_forward", "recurrent_step"]
