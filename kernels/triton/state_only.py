"""State-only passes of linear attention in Triton: the two per-rank passes of sequence parallelism
(`lasp_hf.parallel.lasp`), which need one K x V product per head and no output.

Shapes: B batch, T tokens, H heads, K key/query head dim, V value head dim. With G_t the cumulative
log-decay from the first token (inclusive) and G_T its total:
    final_state_only:        S  = exp(G_T) h0 + sum_t exp(G_T - G_t) k_t^T v_t
    initial_state_grad_only: dS = scale * sum_t exp(G_t) q_t^T do_t   (d sum(o * do) / d initial_state)
Each reads its two token tensors once: the chunk kernels' segment passes (`_fwd_kernel_segment_state`,
`_bwd_kernel_segment_dstate`) give every segment's state (gradient) and log-decay, one program per
(segment, head, K block x V block), the decay formed in registers from g; when B*H does not fill the
device the rows are cut into segments, folded afterwards by `_kernel_segment_scan` (in order for S,
in reverse for dS). Both return float32 [B, H, K, V] and are not differentiable.
"""

from __future__ import annotations

import torch
from lasp_hf.kernels.triton import chunk
from lasp_hf.kernels.triton.chunk_kernels import (
    _bwd_kernel_segment_dstate,
    _fwd_kernel_segment_state,
)
from lasp_hf.kernels.triton.utils import cdiv, empty, interpreting, next_pow2

# A program's state tile: at most MAX_BLOCK_K rows of K and STATE_TILE float32 elements (128 x 64 at
# K = V = 128; launch config `chunk.CONFIGS["state"]`). Each (K, V) block re-reads its k (q) and v (do) columns, so the
# tile is as large as fits without spilling: x is read V / BV times and y K / BK times.
MAX_BLOCK_K = 128
STATE_TILE = 8192


def _state_blocks(K: int, V: int) -> tuple[int, int]:
    BK = max(16, min(MAX_BLOCK_K, next_pow2(K)))
    BV = max(16, min(next_pow2(V), STATE_TILE // BK))
    return BK, BV


def _state_pass(x, y, g, start, scale: float, gradient: bool):
    """sum over each row's segments of x^T y (decayed as in the module docstring), folded from `start`."""
    B, T, H, K = x.shape
    V = y.shape[-1]
    if T == 0:
        return start.float().clone() if start is not None else x.new_zeros(B, H, K, V, dtype=torch.float32)
    BK, BV = _state_blocks(K, V)
    NK, NV = cdiv(K, BK), cdiv(V, BV)
    plan = chunk._dense_plan(B, T, H, NK * NV, x.device, chunk._planning_knobs())
    xf, yf = chunk._flat_tokens(x), chunk._flat_tokens(y)
    g32 = chunk.flat_g(g, B, T, H)
    S = plan.num_segs
    cfg = chunk._config("state", x.dtype, BK, x.device)
    meta = {"H": H, "K": K, "V": V, "BK": BK, "BV": BV, "NV": NV}
    scan = dict(G_MODE=chunk._g_mode(g), BT=chunk.CHUNK_SIZE, DT=chunk._dot_dtype(x.dtype),
                DOT_PREC=chunk._dot_precision(x.dtype), SPLIT=False, DYN_LOOP=not interpreting(), **meta)
    g_arg = g32 if g32 is not None else xf
    local = empty(x, (S, H, K, V), torch.float32)
    seg_decay = empty(x, (S, H), torch.float32)
    grid = (S, H, NK * NV)
    if gradient:
        _bwd_kernel_segment_dstate[grid](xf, yf, g_arg, local, seg_decay, plan.seg_bos, plan.seg_eos, scale,
                                         chunk._loop_bound(plan, scan), STORE_DECAY=True, **scan, **cfg)
    else:
        _fwd_kernel_segment_state[grid](xf, yf, g_arg, local, seg_decay, plan.seg_bos, plan.seg_eos,
                                        chunk._loop_bound(plan, scan), **scan, **cfg)
    if plan.max_segs == 1 and start is None:
        return local  # one segment per row, in row order
    return chunk.fold_segments(local, seg_decay, plan, start, gradient)


@torch.no_grad()
def final_state_only(k, v, g=None, *, initial_state=None):
    """The state after all T tokens, without the output: exp(G_T) h0 + sum_t exp(G_T - G_t) k_t^T v_t.

    Args:
        k: [B, T, H, K]; v: [B, T, H, V] (float32, bfloat16 or float16).
        g: None, [H] or [B, T, H] natural-log decay.
        initial_state: None or [B, H, K, V] (h0).
    Returns:
        float32 [B, H, K, V].
    """
    return _state_pass(k, v, g, initial_state, 1.0, gradient=False)


@torch.no_grad()
def initial_state_grad_only(q, do, g=None, *, scale: float):
    """The gradient of sum(o * do) with respect to the initial state, without k or v:
    scale * sum_t exp(G_t) q_t^T do_t (G_t inclusive of token t).

    Args:
        q: [B, T, H, K]; do: [B, T, H, V] (the same dtype).
        g: None, [H] or [B, T, H] natural-log decay.
        scale: the op's scale of q.
    Returns:
        float32 [B, H, K, V].
    """
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    return _state_pass(q, do, g, None, scale, gradient=True)
