"""Sequence-parallel prefill: the ranks of an SP group each run their slice of one prompt, and every rank ends
with the whole prompt's cache, ready to decode.

Shapes: B batch, T prompt tokens, W ranks in the SP group, L = T // W tokens per rank, R = T - W * L.

How the cache is made (the same collectives as training):
- linear-attention layers: LASP (ring or all-gather, the context's mode) gives every rank the state after the
  whole sequence (`linear_attention(..., output_final_state=True)` returns it on every rank);
- full-attention layers: the keys / values of all slices are all-gathered (as their attention does) and every
  rank keeps them (`sp_softmax_attention(..., return_gathered_kv=True)`).
So no extra hand-off is needed: every rank holds the state a one-process prefill would, and any of them may
decode (typically rank 0; the others may free theirs). The last position's logits live on the last rank and
are broadcast; when W does not divide T, the R < W remaining tokens run as an ordinary cached forward on every
rank.

Each rank runs its slice whole: prefill memory is that of L tokens (chunking inside a slice, as
`config.prompt_chunk_size` does on one device, is not done under SP).
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
from lasp_hf.parallel import comm
from lasp_hf.parallel.context import as_sp_context


def _new_cache(model):
    """An empty cache of the model's own LaspCache class (the one its module imports: a model loaded as hub
    remote code has its own copy, and the model accepts only that class)."""
    module = importlib.import_module(type(model).__module__)
    return module.LaspCache(model.config)


@torch.no_grad()
def sp_prefill(model, input_ids: torch.Tensor, sp_context) -> tuple[torch.Tensor, object]:
    """Prefill `input_ids` across the SP group; call on every rank with the same full prompt.

    Args:
        model: a `LaspForCausalLM` (the same weights on every rank).
        input_ids: `[B, T]`, the whole prompt (unpadded), identical on every rank.
        sp_context: a `SequenceParallelContext` (or SP ProcessGroup); its mode picks ring or all-gather.

    Returns:
        (logits `[B, vocab]` of the prompt's last position, the `LaspCache` holding the whole prompt), the
        same on every rank; continue with `model(next_ids, past_key_values=cache)` or decode from it.
    """
    sp = as_sp_context(sp_context)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a 2-D tensor [B, T], got {getattr(input_ids, 'shape', input_ids)}"
        )
    B, T = input_ids.shape
    shapes = comm.all_gather_object_ints([B, T], sp, input_ids.device)
    if any(shape != [B, T] for shape in shapes):
        raise ValueError(f"every rank of the SP group must pass the same prompt shape; got [B, T] = {shapes}")
    W, L = sp.world_size, T // sp.world_size
    cache = _new_cache(model)
    logits = None
    if L > 0:
        local = input_ids[:, sp.rank * L : (sp.rank + 1) * L]
        out = model(local, past_key_values=cache, use_cache=True, sp_context=sp, logits_to_keep=1)
        logits = out.logits[:, -1].contiguous()
    if W * L < T:
        # Fewer than W tokens left: every rank runs them on its (now whole-prompt) cache.
        out = model(input_ids[:, W * L :], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], cache
    dist.broadcast(logits, src=dist.get_global_rank(sp.group, W - 1), group=sp.group)
    return logits, cache


__all__ = ["sp_prefill"]
