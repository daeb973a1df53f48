"""Chunked prefill: a long prompt with a cache runs as consecutive calls of `prompt_chunk_size` tokens.

Shapes: B batch, T prompt tokens (this call), P tokens already in the cache, C chunk size.

Each chunk is an ordinary cached forward of `LaspModel`: linear-attention layers start from the state the
cache holds (the op's `initial_state`) and leave theirs there; full-attention layers append their keys /
values to the cache and attend over everything cached so far. So chunk after chunk gives the whole prompt's
result, while the per-token activations (projections, GLU, logits) exist for C tokens at a time.

What is returned: the last `hidden_states_to_keep` positions' final hidden states when the caller asks for
only those (`LaspForCausalLM` passes its int `logits_to_keep`, as `generate` does), so memory stays O(C);
otherwise the chunks' outputs are concatenated to `[B, T, hidden]` (all T positions were asked for; only that
output, not the activations, grows with T).
"""

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast


def _slice(x, start: int, end: int):
    return None if x is None else x[:, start:end]


def prefill_in_chunks(
    model,
    chunk_size: int,
    *,
    input_ids,
    inputs_embeds,
    attention_mask,
    position_ids,
    cache_position,
    cache,
    hidden_states_to_keep: int,
    output_hidden_states: bool,
    cache_field: str,
    **kwargs,
) -> BaseModelOutputWithPast:
    """`model(...)` (a `LaspModel`) on T > chunk_size tokens as ceil(T / C) cached calls; see the module
    docstring. attention_mask may cover the P + T or the T new tokens, as for `LaspModel.forward`."""
    main = input_ids if input_ids is not None else inputs_embeds
    B, T = main.shape[:2]
    past_length = cache.get_seq_length()
    full_mask = attention_mask
    if attention_mask is not None and attention_mask.shape[1] == T and past_length > 0:
        # Each chunk passes the mask of everything cached so far: earlier chunks' padding stays masked.
        full_mask = torch.cat([attention_mask.new_ones(B, past_length), attention_mask], dim=1)
    kept, pieces, layer_pieces = None, [], None
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        out = model(
            input_ids=_slice(input_ids, start, end),
            inputs_embeds=_slice(inputs_embeds, start, end),
            attention_mask=None if full_mask is None else full_mask[:, : past_length + end],
            position_ids=_slice(position_ids, start, end),
            cache_position=None if cache_position is None else cache_position[start:end],
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if hidden_states_to_keep > 0:
            kept = hidden if kept is None else torch.cat([kept, hidden], dim=1)
            kept = kept[:, -hidden_states_to_keep:]
        else:
            pieces.append(hidden)
        if output_hidden_states:
            layer_pieces = [[h] for h in out.hidden_states] if layer_pieces is None else layer_pieces
            if start > 0:
                for per_layer, h in zip(layer_pieces, out.hidden_states, strict=True):
                    per_layer.append(h)
    last_hidden_state = kept if hidden_states_to_keep > 0 else torch.cat(pieces, dim=1)
    all_hidden = tuple(torch.cat(h, dim=1) for h in layer_pieces) if output_hidden_states else None
    return BaseModelOutputWithPast(
        last_hidden_state=last_hidden_state, hidden_states=all_hidden, **{cache_field: cache}
    )


__all__ = ["prefill_in_chunks"]
