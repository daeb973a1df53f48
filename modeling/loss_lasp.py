"""Chunked cross-entropy over hidden states: the `[N, vocab]` logits are never materialized.

Each chunk of `chunk_size` tokens computes its logits and its summed token losses. When a gradient is
needed, the same pass turns the chunk's logits into their gradient (`softmax - one_hot`) and, through two
matmuls, into the chunk's rows of the hidden gradient and its share of the lm-head gradient (a fused linear
cross-entropy); then the logits are dropped. The backward pass only scales these two gradients by the
incoming one, so no logits are recomputed, and only `[chunk_size, vocab]` logits exist at a time. The price
is one hidden-sized gradient and a float32 `[vocab, D]` accumulator, held from the forward pass on. The sum
(not the mean) is returned with the number of valid tokens, so a caller can reduce over sequence-parallel
ranks or gradient-accumulation steps exactly.

Shapes: N tokens (all leading dims flattened), C = `chunk_size`, D hidden size, V vocabulary size.
"""

import contextlib

import torch
import torch.nn.functional as F


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(hidden, weight)` would run in here, so the fused pass rounds as a plain one would.

    Autocast casts float32 and half operands of a matmul to its dtype and leaves float64 alone; without it
    the two dtypes must already agree.
    """
    device_type = hidden.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(
            "hidden and lm_head_weight must share a dtype outside autocast, "
            f"got {hidden.dtype} and {weight.dtype}"
        )
    return hidden.dtype


def _autocast_off(device_type: str):
    """Autocast off on `device_type`; nothing to turn off where autocast does not exist (meta tensors)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _fused_fwd(hidden, weight, labels, chunk_size, ignore_index, mm_dtype, needs_grad):
    """Summed token losses of `hidden [N, D]` and, as `needs_grad` asks, their gradients w.r.t. `hidden`
    and `weight [V, D]`.

    Autocast is turned off (it would still be on inside an autograd Function's forward): the operands are
    cast to `mm_dtype` here instead, the weight once rather than per chunk, so no op recasts them unseen.
    """
    need_grad_hidden, need_grad_weight = needs_grad
    acc_dtype = torch.float64 if mm_dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_grad_weight else None
    with _autocast_off(hidden.device.type):
        w = weight.to(mm_dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h, y = hidden[rows].to(mm_dtype), labels[rows]
            logits = F.linear(h, w)  # [C, V]
            logp = torch.log_softmax(logits, dim=-1, dtype=acc_dtype)
            total += F.nll_loss(logp, y, ignore_index=ignore_index, reduction="sum")
            if not (need_grad_hidden or need_grad_weight):
                continue
            # d loss / d logits = softmax - one_hot, into the logits' buffer: one [C, V] pass, rounded once.
            ignored = (y == ignore_index)[:, None]
            target = y[:, None].masked_fill(ignored, 0)
            grad_logits = torch.exp(logp, out=logits)
            grad_logits.scatter_(1, target, logp.gather(1, target).exp_().sub_(1).to(mm_dtype))
            del logp
            # Ignored rows are zeroed on the [C, D] side, which costs far less than zeroing [C, V] rows.
            if need_grad_hidden:
                grad_hidden[rows] = torch.mm(grad_logits, w).masked_fill_(ignored, 0)
            if need_grad_weight:
                h_valid = h.masked_fill(ignored, 0)
                if grad_weight.dtype == mm_dtype:
                    grad_weight.addmm_(grad_logits.T, h_valid)
                else:
                    grad_weight += grad_logits.T @ h_valid
    if need_grad_weight:
        grad_weight = grad_weight.to(weight.dtype)
    return total, grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` whose gradients are computed in the forward pass.

    The loss is a scalar, so its gradients are the saved ones times the incoming scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, ignore_index, mm_dtype):
        loss, grad_hidden, grad_weight = _fused_fwd(
            hidden, weight, labels, chunk_size, ignore_index, mm_dtype, ctx.needs_input_grad[:2]
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output
        if grad_weight is not None:
            grad_weight = grad_weight * grad_output
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    shift_labels: torch.Tensor,
    chunk_size: int = 1024,
    reduction: str = "sum",
    ignore_index: int = -100,
):
    """Cross-entropy of `hidden @ lm_head_weight.T` against `shift_labels`, `chunk_size` tokens at a time.

    The logits matmul runs in the dtype `F.linear` would use (autocast's, else the inputs'); the softmax and
    the loss in float32 (float64 for float64 inputs). Gradients are computed during this call when autograd
    will need them, so the backward pass costs only two scalings.

    Args:
        hidden: `[..., D]` final hidden states (any float dtype; logits of half types are upcast to float32).
        lm_head_weight: `[vocab, D]` output projection, of `hidden`'s dtype unless autocast is on.
        shift_labels: `[...]` (same leading shape as `hidden`) target ids, already shifted (the label of
            position t is the token at t + 1); `ignore_index` marks positions without a target.
        chunk_size: tokens per chunk.
        reduction: `"sum"` (the summed token losses) or `"mean"` (the sum over the valid tokens).
        ignore_index: label value that contributes nothing.

    Returns:
        `(loss, num_valid)`: the float32 scalar loss (float64 for float64 inputs) and the number of labels
        != `ignore_index` (a long scalar tensor). With `"mean"` and no valid label the loss is NaN, as
        `F.cross_entropy` gives.
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
    mm_dtype = _matmul_dtype(hidden, lm_head_weight)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = shift_labels.reshape(-1).to(hidden.device)
    num_valid = (labels != ignore_index).sum()
    if torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad):
        total = _FusedLinearCrossEntropy.apply(
            hidden, lm_head_weight, labels, chunk_size, ignore_index, mm_dtype
        )
    else:
        no_grad = (False, False)
        total, _, _ = _fused_fwd(hidden, lm_head_weight, labels, chunk_size, ignore_index, mm_dtype, no_grad)
    if reduction == "mean":
        total = total / num_valid
    return total, num_valid


__all__ = ["chunked_cross_entropy"]
