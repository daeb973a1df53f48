"""Fast greedy decoding: a lasp model's one-token decoding step, with fixed shapes, replayed as a CUDA graph.

Shapes: B batch, P prompt tokens, N new tokens, M = the key/value buffer length of full-attention layers
(>= P + N), H heads, K / V key / value head dims, D head dim.

Why a graph of our own step, not transformers' static-cache compiled path: a decoding step of a
linear-attention layer already has a fixed shape (the state `[B, H, K, V]` does not grow), so the step is the
eager model's own forward on one token, captured once; it runs the same kernels as eager decoding (greedy
tokens are identical) and needs no `torch.compile` of the model (no recompilation, no graph breaks in the
Triton op). Eagerly, a decoding step's cost at B = 1 is mostly the launch of a few hundred small kernels, which a
graph replay removes; in the graph, the weights' matrix-vector products take most of it. `compile_config` (a
transformers `CompileConfig`) runs the step through `torch.compile` before the capture: Inductor fuses the
elementwise kernels (about 9% less per token for tnl-1b on an H100), at the cost of the identity with eager
decoding (its fused bf16 arithmetic rounds differently), so it is opt-in.

Hybrids: the keys / values of full-attention layers live in buffers preallocated to M slots (the prompt plus
the new tokens, rounded up to a multiple of 256 so one captured graph serves several lengths); a boolean key
mask `[B, 1, 1, M]` marks the slots written so far (and hides left padding). Each step attends over all M
slots, so its cost grows with M (the longest context asked for), not with the tokens so far.

Use: `model.generate(input_ids, max_new_tokens=..., cache_implementation="static")` (greedy only; CUDA graphs
on a GPU, the same static-buffer step run eagerly elsewhere).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .cache_lasp import LaspCache, LaspStateLayer

_SLOT_MULTIPLE = 256
_STOP_CHECK_EVERY = 32  # decoding steps between host checks of "every row has ended" (one sync each)
_MAX_EOS_IDS = 8  # end-token ids live in a fixed buffer, so one captured graph serves any of them
GENERATE_ARGS = ("attention_mask", "max_new_tokens", "eos_token_id", "pad_token_id", "do_sample", "use_cache",
                 "compile_config", "disable_compile")


class _StaticStateLayer(LaspStateLayer):
    """A linear-attention state in a fixed buffer: `set_state` copies into it (a graph replays the same
    addresses)."""

    def __init__(self, state: torch.Tensor):
        super().__init__()
        super().set_state(state)

    def set_state(self, state: torch.Tensor) -> None:
        buffer = self.recurrent_states[0]
        if state is not buffer:  # a decoding step wrote the buffer in place (`LaspStaticCache.steps_in_place`)
            buffer.copy_(state)


class _StaticKVLayer(DynamicLayer):
    """Keys / values of a full-attention layer in buffers `[B, H, M, D]`; `update` writes the step's token at
    the slot `cursor` (a device tensor, so a replay writes the next slot) and returns the whole buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cursor: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.cursor = keys, values, cursor
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.cursor, key_states)
        self.values.index_copy_(2, self.cursor, value_states)
        return self.keys, self.values


class LaspStaticCache(LaspCache):
    """Fixed-shape cache of one decoding step: a float32 state buffer per linear-attention layer, key / value
    buffers of M slots per full-attention layer, the next slot (`cursor`, int64 `[1]`) and `key_mask`
    (bool `[B, 1, 1, M]`, which `LaspModel` passes to the full-attention layers). A linear-attention layer's
    decoding step writes its new state into the layer's buffer (`steps_in_place`), saving a copy per layer.

    The buffers take their shapes and dtypes from a prefilled cache `like` (a layer's state need not be
    `[B, H, D, D]`: a position encoding such as LRPE doubles the key dim), with M slots for keys / values."""

    steps_in_place = True

    def __init__(self, config, like: LaspCache, max_length: int):
        super().__init__(config)
        B = like.batch_size
        self.key_mask = None
        self.cursor = None
        layers = []
        for i, layer_type in enumerate(config.layer_types):
            if layer_type == "linear_attention":
                layers.append(_StaticStateLayer(torch.zeros_like(like.get_state(i))))
                continue
            keys = like.layers[i].keys
            if self.key_mask is None:
                self.cursor = torch.zeros(1, dtype=torch.long, device=keys.device)
                self.key_mask = torch.zeros(B, 1, 1, max_length, dtype=torch.bool, device=keys.device)
            shape = (B, keys.shape[1], max_length, keys.shape[3])
            buffer = torch.zeros(shape, dtype=keys.dtype, device=keys.device)
            layers.append(_StaticKVLayer(buffer, torch.zeros_like(buffer), self.cursor))
        if self.cursor is None:
            self.cursor = torch.zeros(1, dtype=torch.long, device=layers[0].get_state().device)
        self.layers = layers
        self.max_length = max_length

    def fits(self, like: LaspCache) -> bool:
        """Whether `like` (a prefilled cache) has the shapes and dtypes of this cache's buffers."""
        for mine, theirs in zip(self.layers, like.layers, strict=True):
            if isinstance(mine, _StaticStateLayer):
                state = theirs.get_state()
                if state is None or state.shape != mine.get_state().shape or state.dtype != torch.float32:
                    return False
            elif theirs.keys.shape[:2] != mine.keys.shape[:2] or theirs.keys.shape[3] != mine.keys.shape[3]:
                return False
        return True

    def load(self, cache: LaspCache, prompt_mask: torch.Tensor) -> None:
        """Copy a prefilled cache in (states; keys / values into the first P slots) and mark the prompt's real
        tokens (prompt_mask `[B, P]`, 1 = token) in the key mask."""
        P = cache.get_seq_length()
        if P >= self.max_length and self.key_mask is not None:
            raise ValueError(f"the prompt ({P} tokens) does not fit the {self.max_length} key/value slots")
        for mine, theirs in zip(self.layers, cache.layers, strict=True):
            if isinstance(mine, _StaticStateLayer):
                mine.set_state(theirs.get_state())
            else:
                mine.keys[:, :, :P].copy_(theirs.keys)
                mine.values[:, :, :P].copy_(theirs.values)
                mine.keys[:, :, P:].zero_()
                mine.values[:, :, P:].zero_()
        if self.key_mask is not None:
            self.key_mask.zero_()
            self.key_mask[:, 0, 0, :P].copy_(prompt_mask.bool())
        self.cursor.fill_(P)
        self.num_seen_tokens = P

    def get_max_length(self, layer_idx=None) -> int:
        return self.max_length if self.key_mask is not None else -1

    def count_tokens(self, n: int) -> None:
        """Nothing: a step's position lives on the device (`cursor`, the model's position_ids), and a graph
        replay could not advance a host count anyway; the count stays the prompt's length from `load` (and a
        compiled step sees the same host value every call, so it compiles once)."""

    def set_state(self, state: torch.Tensor, layer_idx: int, *args) -> None:
        """Copy a step's state into the layer's buffer (a graph step keeps no rollback window: the static
        decoder does greedy steps only, nothing crops its cache)."""
        self.layers[layer_idx].set_state(state)


class LaspGraphDecoder:
    """Greedy decoding steps of `model` for a batch of B rows, as one CUDA graph (captured on the first CUDA
    use) or, on other devices, the same fixed-shape step run eagerly.

    One step: mark the slot of the current token in the key mask, run the model on the current tokens `[B, 1]`
    at their positions, pick the argmax, replace it by `pad_token_id` in rows that have ended, write it to the
    output buffer and make it the next step's input. Every tensor it touches is a fixed buffer.
    """

    def __init__(self, model, like: LaspCache, max_length: int, compile=False):
        """model: the `LaspForCausalLM`; like: a prefilled cache of the batch (the buffers take its shapes);
        max_length: key/value slots of full-attention layers (M); compile: False, True or a transformers
        `CompileConfig`: run the step's forward through `torch.compile` (with the config's backend and fullgraph)
        before the capture, so Inductor fuses its elementwise kernels."""
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.compiled = _compile_key(compile)
        self.forward = model
        if self.compiled is not None:
            # No CUDA graphs of Inductor's own (the step is captured here: the config's mode is not used) and
            # fixed shapes (they never change).
            backend, fullgraph = self.compiled
            self.forward = torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=False)
        # A graph replays the addresses it captured: casting or moving the model makes a new decoder.
        self.weights = _weights_signature(model)
        self.batch_size, self.max_length = like.batch_size, max_length
        self.cache = LaspStaticCache(model.config, like, max_length)
        B, device = self.batch_size, param.device
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.unfinished = torch.ones(B, dtype=torch.bool, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.output = None
        self.eos = torch.full((_MAX_EOS_IDS,), -1, dtype=torch.long, device=device)  # -1: no id
        self.pad = torch.zeros((), dtype=torch.long, device=device)
        self.has_eos = False
        self.graph = None
        self.num_output_slots = 0

    def __deepcopy__(self, memo):
        # The model keeps its decoder as an attribute: a copied (or pickled) model makes its own on first use
        # instead of sharing this one's buffers and graph (a CUDA graph cannot be copied).
        return None

    def __reduce__(self):
        return (_no_decoder, ())

    def matches(self, like: LaspCache, max_length: int, compile=False) -> bool:
        """Whether this decoder can continue from the prefilled cache `like` with max_length slots (and runs
        the step compiled as asked)."""
        return (
            self.compiled == _compile_key(compile)
            and self.weights == _weights_signature(self.model)
            and self.max_length >= max_length
            and self.cache.fits(like)
        )

    def set_tokens(self, eos_token_ids: list[int], pad_token_id: int) -> None:
        if len(eos_token_ids) > _MAX_EOS_IDS:
            raise ValueError(f"at most {_MAX_EOS_IDS} eos_token_id values, got {len(eos_token_ids)}")
        self.eos.fill_(-1)
        if eos_token_ids:
            self.eos[: len(eos_token_ids)].copy_(torch.tensor(eos_token_ids, dtype=torch.long))
        self.pad.fill_(int(pad_token_id))
        self.has_eos = bool(eos_token_ids)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy choice `[B]`, pad in rows that ended; updates which rows ended (as transformers' greedy
        search)."""
        nxt = logits.argmax(dim=-1)
        nxt = torch.where(self.unfinished, nxt, self.pad)
        self.unfinished &= ~_is_end(nxt, self.eos)
        return nxt

    def _step(self) -> None:
        if self.cache.key_mask is not None:
            self.cache.key_mask.index_fill_(-1, self.cache.cursor, True)
        out = self.forward(
            input_ids=self.tokens,
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        nxt = self._pick(out.logits[:, -1])
        self.output.index_copy_(1, self.step_index, nxt[:, None])
        self.tokens.copy_(nxt[:, None])
        self.positions.add_(1)
        self.cache.cursor.add_(1)
        self.step_index.add_(1)

    def _ensure_output(self, num_new: int) -> None:
        if self.output is None or self.num_output_slots < num_new:
            if self.graph is not None:
                self.graph = None  # the output buffer's address changes: capture again
            self.num_output_slots = max(num_new, 256)
            self.output = torch.zeros(
                self.batch_size, self.num_output_slots, dtype=torch.long, device=self.device
            )

    def _capture(self) -> None:
        """Warm up (kernels compile, allocations settle) on a side stream, then capture one step. The steps
        run on whatever the buffers hold: `start` loads them afterwards (no copy of the key/value buffers is
        kept)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    @torch.no_grad()
    def start(self, cache: LaspCache, prompt_mask, first_tokens, num_new: int) -> None:
        """Load the prefilled cache and the first new token `[B]` (picked from the prompt's last logits);
        capture the step on the first CUDA use. The caller may drop `cache` afterwards (its contents are
        copied)."""
        self._ensure_output(num_new)
        if self.device.type == "cuda" and self.graph is None:
            self._capture()
        # Everything a step reads is (re)set from here on.
        self.cache.load(cache, prompt_mask)
        self.unfinished.fill_(True)
        first = self._pick_first(first_tokens)
        self.output.zero_()
        self.output[:, 0].copy_(first)
        self.tokens.copy_(first[:, None])
        # A row's next position is its number of real tokens (positions count only unpadded tokens).
        self.positions.copy_(prompt_mask.long().sum(dim=1, keepdim=True))
        self.step_index.fill_(1)

    @torch.no_grad()
    def steps(self, n: int) -> None:
        """n decoding steps (graph replays on CUDA), without looking at the tokens."""
        for _ in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()

    @torch.no_grad()
    def run(self, num_new: int) -> torch.Tensor:
        """The remaining num_new - 1 steps after `start`; returns the new tokens `[B, num_new]` (cut where
        every row has ended)."""
        done = 1
        while done < num_new:
            if self.has_eos and not bool(self.unfinished.any()):
                break
            n = min(_STOP_CHECK_EVERY, num_new - done)
            self.steps(n)
            done += n
        new = self.output[:, :num_new].clone()
        return _cut_after_all_ended(new, self.eos if self.has_eos else None)

    def _pick_first(self, first_tokens: torch.Tensor) -> torch.Tensor:
        self.unfinished &= ~_is_end(first_tokens, self.eos)
        return first_tokens


def _no_decoder():
    return None


def _compile_key(compile) -> tuple | None:
    """(backend, fullgraph) of a compiled step, None for an eager one."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return ("inductor", False)
    if not (hasattr(compile, "backend") and hasattr(compile, "fullgraph")):
        raise ValueError(f"compile_config must be a transformers CompileConfig, got {type(compile).__name__}")
    return (compile.backend, bool(compile.fullgraph))


def _weights_signature(model) -> tuple:
    """Where and how the weights live (host metadata only): each parameter's address and dtype."""
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())


def _is_end(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """tokens `[B]` in the end-token buffer (-1 entries match nothing); a comparison, no host sync
    (graph-safe)."""
    return (tokens[:, None] == eos[None, :]).any(dim=-1)


def _cut_after_all_ended(new: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    """Tokens up to the step where the last row produced an end token (as transformers stops)."""
    if eos is None or new.shape[1] == 0:
        return new
    ended = torch.isin(new, eos).long().cumsum(dim=1) > 0  # [B, N]
    all_ended = ended.all(dim=0).nonzero()
    return new if all_ended.numel() == 0 else new[:, : int(all_ended[0]) + 1]


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return ids.flatten().tolist()
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


@torch.no_grad()
def generate_static(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Greedy `generate` through `LaspGraphDecoder` (see the module docstring): the prompt prefills in chunks
    of `config.prompt_chunk_size` into a `LaspCache`, then every new token is one replay of the captured step.

    Args:
        input_ids: `[B, P]` prompt ids. attention_mask (`[B, P]`, *optional*): 1 = token, 0 = (left) padding.
        max_new_tokens (`int`, defaults to the generation config's): tokens to add.
        eos_token_id / pad_token_id (*optional*): as `generate` (defaults from the generation config); rows
            that ended get pad, and decoding stops once every row has ended.
        compile_config (transformers `CompileConfig`, *optional*, defaults to the generation config's): run the
            step through `torch.compile` (its backend and fullgraph) before the capture: about 9% faster per
            token on an H100 (tnl-1b, 32K), but Inductor's fused bf16 arithmetic rounds differently from the eager
            path, so greedy tokens may leave eager `generate`'s; the first call compiles (once per batch size).
            Off by default; `disable_compile=True` turns it off.
    Returns:
        `[B, P + n]` ids, n <= max_new_tokens, as greedy `generate` returns them.
    """
    unknown = sorted(set(kwargs) - set(GENERATE_ARGS))
    if unknown:
        raise ValueError(
            f"generate(cache_implementation='static') decodes greedily and takes {GENERATE_ARGS}; "
            f"got also {unknown}"
        )
    if kwargs.get("do_sample"):
        raise ValueError("generate(cache_implementation='static') decodes greedily: do_sample must be False")
    if kwargs.get("use_cache") is False:
        raise ValueError(
            "generate(cache_implementation='static') decodes from a cache: use_cache must not be False"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a 2-D tensor [B, P], got {getattr(input_ids, 'shape', input_ids)}"
        )
    config = model.generation_config
    max_new = kwargs["max_new_tokens"] if "max_new_tokens" in kwargs else config.max_new_tokens
    if not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new!r}")
    eos = _as_list(kwargs.get("eos_token_id", config.eos_token_id))
    pad = kwargs.get("pad_token_id", config.pad_token_id)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    B, P = input_ids.shape
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be [B, P] = {tuple(input_ids.shape)}, got {tuple(mask.shape)}")

    prefill = model(input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    cache = prefill.cache if "cache" in prefill else prefill.past_key_values
    first = prefill.logits[:, -1].argmax(dim=-1)
    if max_new == 1:
        return torch.cat([input_ids, _cut_after_all_ended(first[:, None], _eos_tensor(eos, first))], dim=1)
    hybrid = "full_attention" in model.config.layer_types
    needed = -(-(P + max_new) // _SLOT_MULTIPLE) * _SLOT_MULTIPLE if hybrid else 0
    compile_step = kwargs.get("compile_config", getattr(config, "compile_config", None))
    if kwargs.get("disable_compile", getattr(config, "disable_compile", None)):
        compile_step = None
    decoder = getattr(model, "_lasp_graph_decoder", None)
    if decoder is None or not decoder.matches(cache, needed, compile_step):
        decoder = None
        model._lasp_graph_decoder = None  # free the old buffers and graph before making new ones
        decoder = LaspGraphDecoder(model, cache, needed, compile=compile_step)
        model._lasp_graph_decoder = decoder
    decoder.set_tokens(eos, pad)
    decoder.start(cache, mask, first, max_new)
    del prefill, cache  # the decoder holds its own copy: the prompt's key/value cache need not exist twice
    return torch.cat([input_ids, decoder.run(max_new)], dim=1)


def _eos_tensor(eos, like):
    return torch.tensor(eos, dtype=torch.long, device=like.device) if eos else None


__all__ = ["LaspGraphDecoder", "LaspStaticCache", "generate_static"]
