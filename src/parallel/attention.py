"""Softmax attention under sequence parallelism (the full-attention layers of hybrid models, LASP-2H).

Shapes: B batch, L = T_local tokens on this rank, T = W * L, H query heads, H_kv key/value heads
(H_kv divides H: grouped-query attention), D head dim.

Every rank gathers the K and V of the whole sequence (one all_gather each, with autograd: the
backward reduce-scatters dK, dV so each rank gets the sum of all ranks' gradients for its slice)
and attends with its own queries. Query i of rank r sits at global position r*L + i and sees the
keys at global positions <= r*L + i of its own document (one causal SDPA call per document run).
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from lasp_hf.kernels.host import host_bounds
from lasp_hf.parallel import comm
from lasp_hf.parallel.context import as_sp_context
from torch.nn.attention.bias import causal_lower_right


def _query_segments(L: int, rank: int, world_size: int, cu_seqlens):
    """(lo, hi, key_start) for each run of this rank's queries that lies in one document: local
    query rows [lo, hi) see the global keys [key_start, rank*L + hi), causally (lower-right aligned)."""
    start = rank * L
    if cu_seqlens is None:
        return [(0, L, 0)]
    bounds = host_bounds(cu_seqlens)
    T = L * world_size
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(
            f"cu_seqlens must describe the full packed sequence: from 0 to T = T_local * W = {T}, never "
            f"decreasing; got {bounds[:4]}...{bounds[-2:]}"
        )
    segments = []
    for n in range(bisect.bisect_right(bounds, start) - 1, len(bounds) - 1):
        doc_start, doc_end = bounds[n], bounds[n + 1]
        if doc_start >= start + L:
            break
        lo, hi = max(doc_start, start), min(doc_end, start + L)
        if lo < hi:
            segments.append((lo - start, hi - start, doc_start))
    return segments


def sp_softmax_attention(q, k, v, *, sp_context, cu_seqlens=None, scale=None, return_gathered_kv=False):
    """Causal softmax attention of this rank's queries over the whole (sharded) sequence.

    Args:
        q: [B, L, H, D]; k, v: [B, L, H_kv, D] (H_kv divides H): this rank's slice.
        sp_context: a SequenceParallelContext (or a ProcessGroup).
        cu_seqlens: optional int [N + 1], B == 1: boundaries of the FULL packed sequence
            (T = L * W); attention stays inside each document.
        scale: defaults to D ** -0.5.
        return_gathered_kv: also return the whole sequence's (k, v), each [B, T, H_kv, D] (a prefill
            keeps them as its cache).

    Returns:
        [B, L, H, D] in q's dtype; with return_gathered_kv, (that, (k_all, v_all)).
    """
    sp = as_sp_context(sp_context)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T_local, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, L, H = q.shape[:3]
    H_kv = k.shape[2]
    if k.shape[:2] != (B, L) or v.shape[:3] != k.shape[:3] or H % H_kv != 0:
        raise ValueError(
            f"k and v must be [B, T_local, H_kv, D] with q's B, T_local = {(B, L)} and H_kv dividing H = {H}; "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens packs documents along T and needs B == 1, got B = {B}")
    k_all = comm.gather_sequence(k, sp)                                  # [B, T, H_kv, D]
    v_all = comm.gather_sequence(v, sp)
    gathered = (k_all, v_all)
    if H_kv != H:
        k_all = k_all.repeat_interleave(H // H_kv, dim=2)
        v_all = v_all.repeat_interleave(H // H_kv, dim=2)
    # One causal SDPA call per document run of the queries (lower-right aligned causal bias: no
    # [L, T] mask is materialized, so SDPA keeps its fused kernels).
    qh, kh, vh = q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2)
    outs = []
    for lo, hi, key_start in _query_segments(L, sp.rank, sp.world_size, cu_seqlens):
        key_end = sp.rank * L + hi
        bias = causal_lower_right(hi - lo, key_end - key_start)
        outs.append(F.scaled_dot_product_attention(
            qh[:, :, lo:hi], kh[:, :, key_start:key_end], vh[:, :, key_start:key_end], attn_mask=bias, scale=scale,
        ))
    o = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).transpose(1, 2)
    return (o, gathered) if return_gathered_kv else o
