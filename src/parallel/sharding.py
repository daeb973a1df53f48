"""Cut a batch for one rank of a sequence-parallel group (labels shifted before the cut).

Shapes: B batch, T tokens of the full sequence, W ranks in the SP group, L = T / W tokens per rank.
"""

from __future__ import annotations

import torch
from lasp_hf.parallel.context import as_sp_context

IGNORE_INDEX = -100
# Per-token tensors that are cut along the sequence dim (labels become shift_labels first).
_PER_TOKEN_KEYS = ("input_ids", "inputs_embeds", "position_ids", "shift_labels", "attention_mask", "seq_idx")


def packed_boundaries(position_ids: torch.Tensor) -> torch.Tensor | None:
    """int32 [N + 1] document boundaries from position_ids [1, T] that restart at their minimum
    (as transformers' `prepare_fa_kwargs_from_position_ids` reads them), or None when unpacked."""
    flat = position_ids.reshape(-1)
    starts = (flat == flat.min()).nonzero().view(-1)
    if starts.numel() <= 1 and (starts.numel() == 0 or starts[0].item() == 0):
        return None
    if starts[0].item() != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


def shift_labels_packed(labels: torch.Tensor, cu_seqlens: torch.Tensor | None, ignore_index: int = IGNORE_INDEX):
    """labels [..., T] -> shift_labels [..., T]: token t predicts labels[t + 1]; ignore_index after
    the last token and, when packed, at the last token of every document (it must not predict the
    next document's first token; DataCollatorWithFlattening gets the same by putting -100 at
    each document's first label)."""
    shifted = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), ignore_index)], dim=-1)
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].long().to(labels.device) - 1
        shifted[..., ends[ends >= 0]] = ignore_index
    return shifted


def shard_batch_for_sp(batch: dict, sp_context, *, seq_dim: int = 1) -> dict:
    """This rank's share of a batch that every rank of the SP group holds whole.

    Args:
        batch: `input_ids` (or `inputs_embeds`) [B, T]; optional `labels` [B, T], `position_ids` [B, T]
            (restarting at their minimum marks packed documents, B == 1), `shift_labels` (already
            shifted on the full sequence), `cu_seq_lens_q` (full-sequence boundaries), an
            all-ones `attention_mask`. Other keys pass through unchanged.
        sp_context: the SequenceParallelContext (or SP ProcessGroup) of this rank.
        seq_dim: the sequence dim of the per-token tensors.

    Returns:
        A new dict: `input_ids`, `position_ids`, `shift_labels` (from labels, shifted on the full
        sequence), `attention_mask`, ... cut to tokens [r*L, (r+1)*L); the FULL int32
        `cu_seq_lens_q` / `cu_seq_lens_k` and `max_length_q` / `max_length_k` when packed;
        `sp_context`. `labels` is dropped (shifting a slice would lose the prediction at each cut).
    """
    sp = as_sp_context(sp_context)
    main = batch.get("input_ids", batch.get("inputs_embeds"))
    if main is None:
        raise ValueError(f"the batch needs input_ids or inputs_embeds, got keys {sorted(batch)}")
    T, W = main.shape[seq_dim], sp.world_size
    if T % W != 0:
        lower, upper = T - T % W, T - T % W + W
        raise ValueError(
            f"sequence parallelism over W = {W} ranks needs a sequence length divisible by {W}, got T = {T}; "
            f"pad or pack to {upper}" + (f" or cut to {lower}" if lower > 0 else "")
        )
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError(
            "sequence parallelism does not take padded batches (attention_mask has zeros); pack the sequences "
            "instead (e.g. DataCollatorWithFlattening)"
        )
    out = dict(batch)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        shape = [1] * main.dim()
        shape[seq_dim] = T
        position_ids = torch.arange(T, device=main.device).view(shape[:seq_dim + 1]).expand(*main.shape[:seq_dim + 1])

    cu_seqlens = batch.get("cu_seq_lens_q")
    if cu_seqlens is None and main.shape[0] == 1:
        cu_seqlens = packed_boundaries(position_ids)
    elif cu_seqlens is None:
        rows = position_ids.reshape(position_ids.shape[0], -1)
        if bool((rows == rows.min(dim=1, keepdim=True).values)[:, 1:].any()):
            raise ValueError(f"packed sequences (position_ids that restart) need batch size 1, got B = {main.shape[0]}")
    if cu_seqlens is not None:
        cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=main.device)
        if cu_seqlens[0].item() != 0 or cu_seqlens[-1].item() != T:
            raise ValueError(f"cu_seq_lens_q must run from 0 to T = {T}, got {cu_seqlens.tolist()}")
        max_length = int(cu_seqlens.diff().max().item())
        out.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_length, max_length_k=max_length)

    labels = out.pop("labels", None)
    if "shift_labels" not in out and labels is not None:
        out["shift_labels"] = shift_labels_packed(labels.movedim(seq_dim, -1), cu_seqlens).movedim(-1, seq_dim)
    out["position_ids"] = position_ids

    L = T // W
    for key in _PER_TOKEN_KEYS:
        value = out.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > seq_dim and value.shape[seq_dim] == T:
            out[key] = value.narrow(seq_dim, sp.rank * L, L)
    out["sp_context"] = sp
    return out
