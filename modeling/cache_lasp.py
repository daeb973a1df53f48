"""The generation cache of the lasp model family: a float32 recurrent state per linear-attention layer
(its size does not grow with the context, so a decode step costs O(1) in the context length) and the
keys/values of every full-attention layer (transformers' `DynamicLayer`).

Shapes: B batch, H heads, K key head dim, V value head dim.
"""

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.utils._pytree as pytree
from lasp_hf.ops import linear_attention
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer


def _compact(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, or a copy of it when it is a view into a larger storage: a decoding step's fused projections
    (`parts_lasp.FusedRows.project`) are views of one product, and a window that kept v as such would keep the
    step's whole q / k / v / gate product alive (2.5x the k and v it needs for tnl-1b's block). An expanded
    tensor (a fixed decay) is smaller in memory than its shape and stays as it is. Traced by torch.compile (no
    storages; the block is not used there) t is kept."""
    if t is None or torch.compiler.is_compiling() or t.untyped_storage().nbytes() <= t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


@dataclass
class _Replay:
    """What a linear-attention layer needs to roll its state back over its latest tokens: the state at the start
    of a window of recent tokens (None = zeros), how many tokens the cache held then, and the keys / values
    `[B, T, H, D]` and log decays (None or `[B, T, H]`, padding already masked) of the forward calls since, one
    entry per call (joined only when a crop needs them, so a decode step costs no copy)."""

    start: int
    state: torch.Tensor | None
    ks: list
    vs: list
    gs: list
    length: int = 0

    def append(self, k, v, g) -> None:
        self.ks.append(_compact(k))
        self.vs.append(_compact(v))
        self.gs.append(_compact(g))
        self.length += k.shape[1]

    def _joined(self, num_tokens: int):
        k = torch.cat(self.ks, dim=1)[:, :num_tokens]
        v = torch.cat(self.vs, dim=1)[:, :num_tokens]
        g = None if self.gs[0] is None else torch.cat(self.gs, dim=1)[:, :num_tokens]
        return k, v, g

    def state_after(self, num_tokens: int) -> torch.Tensor | None:
        """The state after the first `num_tokens` tokens of the window."""
        if num_tokens == 0:
            return self.state
        k, v, g = self._joined(num_tokens)
        # The state does not depend on q or the scale; k stands in for q.
        _, state = linear_attention(k, k, v, g, scale=1.0, initial_state=self.state, output_final_state=True)
        return state

    def keep(self, num_tokens: int) -> "_Replay":
        """The window cut to its first `num_tokens` tokens."""
        if num_tokens == 0:
            return _Replay(self.start, self.state, [], [], [])
        k, v, g = self._joined(num_tokens)
        return _Replay(self.start, self.state, [k], [v], [g], num_tokens)

    def map_batch(self, fn) -> "_Replay":
        return _Replay(
            self.start,
            fn(self.state) if self.state is not None else None,
            [fn(k) for k in self.ks],
            [fn(v) for v in self.vs],
            [fn(g) if g is not None else None for g in self.gs],
            self.length,
        )


class LaspStateLayer(LinearAttentionLayer):
    """The float32 recurrent state `[B, H, K, V]` of one linear-attention layer (transformers'
    linear-attention cache layer, with the state replaced rather than copied in place so its batch size may
    change).

    It also keeps what rolls the state back over its latest tokens (`_Replay`: a state and the keys, values and
    decays of the calls since), so that assisted and prompt-lookup decoding can crop the tokens a verification
    pass rejected, from the target model's last call or across the draft model's decode steps. Two windows,
    never recomputed to advance: once the current one holds `LaspCache.rollback_tokens` tokens, the next call
    opens a new one from the state it starts at, and the full one stays behind it until the new one holds
    rollback_tokens tokens too. So the last call and at least the last rollback_tokens tokens can always be
    cropped, for the k and v of fewer than 2 x rollback_tokens tokens plus one call (a prompt's or prefill
    chunk's k and v are kept until rollback_tokens tokens follow it; of a chunked prefill, the last chunk's)."""

    replay: _Replay | None = None
    previous_replay: _Replay | None = None

    def get_state(self):
        return self.recurrent_states[0] if self.is_recurrent_states_initialized[0] else None

    def set_state(
        self, state: torch.Tensor | None, replay: _Replay | None = None, previous_replay: _Replay | None = None
    ) -> None:
        if state is None:
            self.reset()
            return
        if self.device is None:
            self.device, self.dtype = state.device, state.dtype
        self.recurrent_states[0] = state
        self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True
        self.replay, self.previous_replay = replay, previous_replay

    def reset(self) -> None:
        self.recurrent_states[0] = None
        self.is_recurrent_states_initialized[0] = False
        self.has_previous_state[0] = False
        self.replay = self.previous_replay = None

    def _map_state(self, fn) -> None:
        state = self.get_state()
        if state is not None:
            self.recurrent_states[0] = fn(state)
        if self.replay is not None:
            self.replay = self.replay.map_batch(fn)
        if self.previous_replay is not None:
            self.previous_replay = self.previous_replay.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda s: s[indices, ...])

    @property
    def is_croppable(self) -> bool:
        return True

    def _window_for(self, length: int) -> _Replay:
        """The window that holds the state after the first `length` tokens, or a ValueError."""
        replay = self.replay
        if replay is not None and length < replay.start and self.previous_replay is not None:
            replay = self.previous_replay  # it ends where the current window starts
        end = self.replay.start + self.replay.length if self.replay is not None else None
        if replay is None or not replay.start <= length <= end:
            span = f"[{replay.start}, {end}]" if replay is not None else "none"
            raise ValueError(
                f"a linear-attention state can be cropped only back over its latest tokens (lengths {span}; "
                f"LaspCache.rollback_tokens sets how many), got {length}: earlier tokens are folded into the state"
            )
        return replay

    def check_crop(self, length: int) -> None:
        if self.get_state() is not None:
            self._window_for(length)

    def crop_to(self, length: int) -> None:
        """Roll the state back to the first `length` tokens seen; `length` must fall inside the windows."""
        if self.get_state() is None:
            return
        replay = self._window_for(length)
        state = replay.state_after(length - replay.start)
        if state is None:
            self.reset()
        else:
            self.set_state(state, replay.keep(length - replay.start))


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
        # Tokens before the last call that linear-attention states can still be cropped back over (assisted
        # decoding crops a draft model's rejected decode steps: at most its candidates per round, 20 by default).
        self.rollback_tokens = 64

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_seen_tokens

    def count_tokens(self, n: int) -> None:
        """Called by the model after each forward over n new tokens (of all ranks under SP)."""
        self.num_seen_tokens += n

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def get_state(self, layer_idx: int):
        return self.layers[layer_idx].get_state()

    def set_state(
        self,
        state: torch.Tensor,
        layer_idx: int,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        g: torch.Tensor | None = None,
    ) -> None:
        """Store a linear-attention layer's state after a call; with the call's k, v `[B, T, H, D]` and g (as
        the op took them) the cache can crop back into the call."""
        layer = self.layers[layer_idx]
        replay = previous = None  # without k, v (a state set from outside) nothing can be cropped back
        if k is not None:
            if g is not None and g.dim() == 1:
                g = g.expand(k.shape[0], k.shape[1], -1)  # one form for every call, so calls can be joined
            replay, previous = layer.replay, layer.previous_replay
            joins = replay is not None and replay.start + replay.length == self.num_seen_tokens and (
                (replay.gs[0] is None) == (g is None) if replay.gs else True
            )
            if not joins:
                replay, previous = _Replay(self.num_seen_tokens, layer.get_state(), [], [], []), None
            elif replay.length >= self.rollback_tokens:
                # A new window from the state this call starts at (known: no recompute); the full one stays
                # behind it until the new one fills.
                replay, previous = _Replay(self.num_seen_tokens, layer.get_state(), [], [], []), replay
            replay.append(k, v, g)
            if replay.length >= self.rollback_tokens:
                previous = None  # the window alone reaches rollback_tokens back (a prefill chunk: one chunk kept)
        layer.set_state(state, replay, previous)

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
        return True

    def crop(self, max_length: int) -> None:
        """Drop the last tokens (as assisted decoding does after verifying candidates): `max_length < 0` removes
        `-max_length` tokens, `max_length > 0` keeps the first `max_length` (transformers' older convention),
        0 does nothing. Linear-attention states roll back only into their last forward call (see
        `LaspStateLayer`); softmax layers drop keys and values."""
        length = self.num_seen_tokens + max_length if max_length <= 0 else max_length
        if length >= self.num_seen_tokens:
            return
        if length < 0:
            raise ValueError(f"cannot crop {-max_length} tokens from a cache of {self.num_seen_tokens}")
        for layer in self.layers:  # every layer can, before any changes
            if isinstance(layer, LaspStateLayer):
                layer.check_crop(length)
        for layer in self.layers:
            if isinstance(layer, LaspStateLayer):
                layer.crop_to(length)
            elif layer.is_initialized:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
        self.num_seen_tokens = length

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


def _flatten(cache: LaspCache):
    """Leaves: each layer's state (linear) or keys and values (softmax), None where empty. The layer kinds and
    the token count are the tree's context, so an exported program is tied to the position it was traced at."""
    children = [
        layer.get_state() if isinstance(layer, LaspStateLayer) else (layer.keys, layer.values)
        for layer in cache.layers
    ]
    return children, (tuple(cache.layer_types), cache.num_seen_tokens)


def _flatten_with_keys(cache: LaspCache):
    children, context = _flatten(cache)
    return [(pytree.SequenceKey(i), child) for i, child in enumerate(children)], context


def _unflatten(children, context) -> LaspCache:
    layer_types, num_seen_tokens = context
    cache = LaspCache(SimpleNamespace(layer_types=list(layer_types)))
    for layer, child in zip(cache.layers, children, strict=True):
        if isinstance(layer, LaspStateLayer):
            if child is not None:
                layer.set_state(child)
        elif child[0] is not None:
            layer.lazy_initialization(*child)
            layer.keys, layer.values = child
    cache.num_seen_tokens = num_seen_tokens
    return cache


# A pytree node, so that torch.export and torch.compile take a LaspCache as an input or output.
if LaspCache not in pytree.SUPPORTED_NODES:
    pytree.register_pytree_node(
        LaspCache,
        _flatten,
        _unflatten,
        serialized_type_name=f"{LaspCache.__module__}.{LaspCache.__name__}",
        flatten_with_keys_fn=_flatten_with_keys,
    )

__all__ = ["LaspCache"]
