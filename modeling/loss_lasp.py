"""Chunked cross-entropy over hidden states: the `[N, vocab]` logits are never materialized.

Each chunk of `chunk_size` tokens computes its logits, its summed token losses, and drops the logits;
`torch.utils.checkpoint` recomputes them in the backward pass, so forward and backward both hold only
`[chunk_size, vocab]` logits at a time. The sum (not the mean) is returned with the number of valid
tokens, so a caller can reduce over sequence-parallel ranks or gradient-accumulation steps exactly.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(hidden, weight, labels, ignore_index: int):
    logits = F.linear(hidden, weight)
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    shift_labels: torch.Tensor,
    chunk_size: int = 1024,
    reduction: str = "sum",
    ignore_index: int = -100,
):
    """Cross-entropy of `hidden @ lm_head_weight.T` against `shift_labels`, `chunk_size` tokens at a time.

    Args:
        hidden: `[..., D]` final hidden states (any float dtype; logits of half types are upcast to float32).
        lm_head_weight: `[vocab, D]` output projection.
        shift_labels: `[...]` (same leading shape as `hidden`) target ids, already shifted (the label of
            position t is the token at t + 1); `ignore_index` marks positions without a target.
        chunk_size: tokens per chunk.
        reduction: `"sum"` (the summed token losses) or `"mean"` (the sum over the valid tokens).
        ignore_index: label value that contributes nothing.

    Returns:
        `(loss, num_valid)`: the float32 scalar loss and the number of labels != `ignore_index` (a long scalar
        tensor). With `"mean"` and no valid label the loss is NaN, as `F.cross_entropy` gives.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if hidden.shape[:-1] != shift_labels.shape:
        raise ValueError(
            f"shift_labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(shift_labels.shape)}"
        )
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = shift_labels.reshape(-1).to(hidden.device)
    valid = labels != ignore_index
    num_valid = valid.sum()
    total = hidden.new_zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    use_checkpoint = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if use_checkpoint:
            total = total + checkpoint(
                _chunk_loss_sum, h, lm_head_weight, y, ignore_index, use_reentrant=False
            )
        else:
            total = total + _chunk_loss_sum(h, lm_head_weight, y, ignore_index)
    if reduction == "mean":
        total = total / num_valid
    return total, num_valid


__all__ = ["chunked_cross_entropy"]
