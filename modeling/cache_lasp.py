"""The generation cache of the lasp model family: a float32 recurrent state per linear-attention layer
(its size does not grow with the context, so a decode step costs O(1) in the context length) and the
keys/values of every full-attention layer (transformers' `DynamicLayer`).

Shapes: B batch, H heads, K key head dim, V value head dim.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer


class LaspStateLayer(LinearAttentionLayer):
    """The float32 recurrent state `[B, H, K, V]` of one linear-attention layer (transformers'
    linear-attention cache layer, with the state replaced rather than copied in place so its batch size may
    change)."""

    def get_state(self):
        return self.recurrent_states[0] if self.is_recurrent_states_initialized[0] else None

    def set_state(self, state: torch.Tensor) -> None:
        if self.device is None:
            self.device, self.dtype = state.device, state.dtype
        self.recurrent_states[0] = state
        self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True

    def reset(self) -> None:
        self.recurrent_states[0] = None
        self.is_recurrent_states_initialized[0] = False
        self.has_previous_state[0] = False

    def _map_state(self, fn) -> None:
        state = self.get_state()
        if state is not None:
            self.recurrent_states[0] = fn(state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda s: s[indices, ...])

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a linear-attention state cannot be cropped (the past tokens are folded into it)"
        )


class LaspCache(Cache):
    """Cache of a [`LaspModel`]: one `LaspStateLayer` per linear-attention layer and one `DynamicLayer` per
    full-attention layer, in `config.layer_types` order.

    It counts the tokens it has seen itself (`get_seq_length`), so it works for models without any
    full-attention layer. The model creates it when `use_cache=True`; pass it back as `past_key_values`
    (or `cache`) to continue from where it stopped.

    Example:

    ```python
    >>> cache = LaspCache(model.config)
    >>> out = model(input_ids, past_key_values=cache, use_cache=True)
    >>> cache = out.past_key_values  # `out.cache` on newer transformers
    >>> out = model(next_ids, past_key_values=cache, use_cache=True)
    ```
    """

    def __init__(self, config):
        layers = [LaspStateLayer() if t == "linear_attention" else DynamicLayer() for t in config.layer_types]
        super().__init__(layers=layers)
        self.layer_types = list(config.layer_types)
        self.num_seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_seen_tokens

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def get_state(self, layer_idx: int):
        return self.layers[layer_idx].get_state()

    def set_state(self, state: torch.Tensor, layer_idx: int) -> None:
        self.layers[layer_idx].set_state(state)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Appends keys/values `[B, H, T, D]` of a full-attention layer; returns all of them."""
        if not isinstance(self.layers[layer_idx], DynamicLayer):
            raise ValueError(
                f"layer {layer_idx} is a linear-attention layer; it keeps a state, not keys and values"
            )
        return self.layers[layer_idx].update(key_states, value_states)

    def get_mask_sizes(self, *args, **kwargs):
        raise NotImplementedError("LaspModel builds its own attention masks")

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        return [isinstance(layer, LaspStateLayer) for layer in self.layers]

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "LaspCache cannot be cropped: linear-attention states fold the past into one matrix"
        )

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.num_seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            state = layer.get_state() if isinstance(layer, LaspStateLayer) else layer.keys
            if state is not None:
                return state.shape[0]
        return -1


__all__ = ["LaspCache"]
