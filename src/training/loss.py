"""The token-weighted loss of a DP x SP step, scaled so that averaged gradients are the unsharded ones.

One optimizer step sees N target tokens (labels shifted on the full sequence, -100 excluded), spread
over P = D x W ranks (D data-parallel groups of W sequence-parallel ranks, gradient-accumulation
micro-batches included). Rank p sums the token losses of its slice: S_p. The unsharded loss is

    L = sum_p S_p / N.

DDP, FSDP2 and ZeRO all average gradients over the P ranks: g = (1/P) sum_p grad(l_p). With

    l_p = P * S_p / N

that is sum_p grad(S_p) / N = grad(L): the LASP collectives carry every rank's share of
d S_p / d(state) back to the rank that produced the state, so the sum over ranks of their local
parameter gradients is the gradient of the sum. The logged loss, the mean of l_p over the ranks,
is L itself.

Without averaging over data-parallel groups (`average_tokens_across_devices=False`), N_g counts
only SP group g's tokens and l_p = W * S_p / N_g: the step then averages the D group losses L_g, as
plain data parallelism without token averaging does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from lasp_hf.parallel import SequenceParallelContext

IGNORE_INDEX = -100


def local_target_tokens(batches: Iterable[dict], device=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """int64 scalar: target tokens (`shift_labels` != ignore_index) in this rank's slices of `batches`."""
    total = torch.zeros((), dtype=torch.int64, device=device)
    for batch in batches:
        if "shift_labels" not in batch:
            raise ValueError(f"expected batches cut by shard_batch_for_sp (with shift_labels), got keys {sorted(batch)}")
        total += (batch["shift_labels"] != ignore_index).sum().to(total.device)
    return total


def global_target_tokens(local: torch.Tensor, sp: SequenceParallelContext, across_dp: bool = True) -> torch.Tensor:
    """Sum `local` over the SP group, and over every rank when `across_dp` (the N of the module docstring)."""
    total = local.clone()
    if dist.is_initialized():
        dist.all_reduce(total, group=None if across_dp else sp.group)
    return total


def loss_multiplier(sp: SequenceParallelContext, across_dp: bool = True) -> int:
    """P (all ranks) when the token count spans all ranks, else W: the factor of the module docstring."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return world if across_dp else sp.world_size


def scale_loss(loss_sum: torch.Tensor, num_tokens: torch.Tensor, multiplier: int) -> torch.Tensor:
    """l_p = multiplier * S_p / N (N clamped to 1: a step without targets contributes zero loss)."""
    return loss_sum * multiplier / num_tokens.clamp(min=1).to(loss_sum.device, loss_sum.dtype)


__all__ = ["global_target_tokens", "local_target_tokens", "loss_multiplier", "scale_loss"]
