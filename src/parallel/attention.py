"""Softmax attention under sequence parallelism (the full-attention layers of hybrid models, LASP-2H).

Shapes: B batch, L = T_local tokens on this rank, T = W * L, H query heads, H_kv key/value heads
(H_kv divides H: grouped-query attention), D head dim.

Every rank gathers the K and V of the whole sequence (one all_gather each, with autograd: the
backward reduce-scatters dK, dV so each rank gets the sum of all ranks' gradients for its slice)
and attends with its own queries. Query i of rank r sits at global position r*L + i and sees the
keys at global positions <= r*L + i of its own document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lasp_hf.parallel import comm
from lasp_hf.parallel.context import as_sp_context


def _document_ids(cu_seqlens: torch.Tensor, T: int, device) -> torch.Tensor:
    """[T] int: the index of the packed document each token belongs to."""
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    if bounds.dim() != 1 or bounds.numel() < 2 or bounds[0].item() != 0 or bounds[-1].item() != T:
        raise ValueError(
            f"cu_seqlens must describe the full packed sequence: 1-D, from 0 to T = {T}; got {cu_seqlens.tolist()}"
        )
    return torch.bucketize(torch.arange(T, device=device), bounds[1:], right=True)


def sp_attention_mask(L: int, rank: int, world_size: int, cu_seqlens=None, device=None) -> torch.Tensor:
    """Boolean [L, T] mask (True = attend) for rank `rank`'s queries over the whole sequence."""
    T = L * world_size
    q_pos = rank * L + torch.arange(L, device=device)
    k_pos = torch.arange(T, device=device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if cu_seqlens is not None:
        doc = _document_ids(cu_seqlens, T, device)
        mask &= doc[None, :] == doc[q_pos][:, None]
    return mask


def sp_softmax_attention(q, k, v, *, sp_context, cu_seqlens=None, scale=None):
    """Causal softmax attention of this rank's queries over the whole (sharded) sequence.

    Args:
        q: [B, L, H, D]; k, v: [B, L, H_kv, D] (H_kv divides H): this rank's slice.
        sp_context: a SequenceParallelContext (or a ProcessGroup).
        cu_seqlens: optional int [N + 1], B == 1: boundaries of the FULL packed sequence
            (T = L * W); attention stays inside each document.
        scale: defaults to D ** -0.5.

    Returns:
        [B, L, H, D] in q's dtype.
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
    if H_kv != H:
        k_all = k_all.repeat_interleave(H // H_kv, dim=2)
        v_all = v_all.repeat_interleave(H // H_kv, dim=2)
    mask = sp_attention_mask(L, sp.rank, sp.world_size, cu_seqlens, q.device)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask, scale=scale,
    )
    return o.transpose(1, 2)
