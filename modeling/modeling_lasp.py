"""The lasp model family: linear-attention causal LMs (TransNormerLLM's lightning attention, basic linear
attention, gated linear attention) with optional softmax-attention layers, for Hugging Face Transformers.

Shapes: B batch, T tokens (this call), P tokens already in the cache, H heads, D head dim.

The model is written for one device. Sequence parallelism reaches it only through `sp_context`, which the
token mixers hand to `lasp_hf.linear_attention` (linear layers) or `sp_softmax_attention` (softmax layers);
each rank then passes its own slice of `input_ids` / `position_ids` / `shift_labels` and the full
`cu_seq_lens_q`.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .cache_lasp import LaspCache
from .configuration_lasp import LaspConfig
from .layers_lasp import (
    LaspGLU,
    LaspLinearAttention,
    LaspRMSNorm,
    LaspRotaryEmbedding,
    LaspSoftmaxAttention,
    build_norm,
    chunked_over_tokens,
    fused_decode_applies,
)
from .parts_lasp import LinearLrpe, LinearRotary, fixed_decay
from .loss_lasp import chunked_cross_entropy
from .prefill_lasp import prefill_in_chunks

logger = logging.get_logger(__name__)

# transformers renamed the outputs' cache field from `past_key_values` to `cache` during 5.x.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_LOSS_REDUCTIONS = ("mean", "sum")


def check_token_ids(ids: torch.Tensor, vocab_size: int, name: str, ignore_index: int | None = None) -> None:
    """Every id in [0, vocab_size) (or == ignore_index), else a ValueError naming the first bad one and its position.

    CPU tensors are checked here. CUDA tensors get an asynchronous device assert instead (no host sync on the
    hot path): a later CUDA call (at the latest the next synchronizing one) fails with the message (rerun on CPU
    for the position).
    """
    if torch.compiler.is_compiling():
        return
    ok = (ids >= 0) & (ids < vocab_size)
    if ignore_index is not None:
        ok |= ids == ignore_index
    expected = f"[0, vocab_size = {vocab_size})" + (f" or {ignore_index}" if ignore_index is not None else "")
    if ids.device.type != "cpu":
        if not (ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            torch._assert_async(ok.all(), f"lasp_hf: {name} holds an id outside {expected}")
        return
    if not bool(ok.all()):
        index = tuple(int(i) for i in torch.nonzero(~ok)[0])
        raise ValueError(
            f"{name} must hold ids in {expected}; got {int(ids[index])} at {name}[{', '.join(map(str, index))}]"
        )


class LaspDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)), then x + GLU(norm(x)); the second half in chunks of
    `config.mlp_chunk_size` tokens when that is set (`chunked_over_tokens`), and the token-wise parts of a
    linear mixer (with its norm) in chunks of `config.attention_chunk_size` (see `LaspLinearAttention`)."""

    def __init__(self, config: LaspConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "full_attention":
            self.token_mixer = LaspSoftmaxAttention(config, layer_idx)
        else:
            self.token_mixer = LaspLinearAttention(config, layer_idx)
        self.channel_mixer = LaspGLU(config)
        self.input_layernorm = build_norm(config, config.hidden_size)
        self.post_attention_layernorm = build_norm(config, config.hidden_size)
        self.config = config

    def _mix_channels(self, hidden_states):
        return self.channel_mixer(self.post_attention_layernorm(hidden_states))

    def forward(
        self,
        hidden_states,
        linear_mask=None,
        attn_mask=None,
        position_embeddings=None,
        cu_seqlens=None,
        cache=None,
        sp_context=None,
        output_attentions=False,
        **kwargs,
    ):
        """Returns the block's output, or (output, attention weights) with `output_attentions` (the weights of a
        softmax layer, None for a linear layer, which has no attention matrix)."""
        # One token per row with a cache: the fused decoding kernels where they apply (`fused_decode_applies`);
        # each half's decode_step returns None where it cannot take them, and the plain path below runs instead.
        fused = not output_attentions and fused_decode_applies(
            hidden_states, cache, sp_context, self.channel_mixer.down_proj.weight
        )
        residual = hidden_states
        attn_weights = None
        mixed = None
        if fused and self.layer_type != "full_attention":
            mixed = self.token_mixer.decode_step(
                hidden_states, self.input_layernorm, cache, kwargs.get("position_ids"), linear_mask
            )
        if mixed is not None:
            hidden_states = mixed  # the residual is already added
        elif self.layer_type == "full_attention":
            hidden_states, attn_weights = self.token_mixer(
                self.input_layernorm(hidden_states),
                position_embeddings=position_embeddings,
                attn_mask=attn_mask,
                cu_seqlens=cu_seqlens,
                cache=cache,
                sp_context=sp_context,
                output_attentions=output_attentions,
                **kwargs,
            )
            hidden_states = residual + hidden_states
        else:
            # The mixer applies the norm itself (inside its token chunks under config.attention_chunk_size).
            hidden_states = self.token_mixer(
                hidden_states,
                input_norm=self.input_layernorm,
                mask=linear_mask,
                cu_seqlens=cu_seqlens,
                cache=cache,
                sp_context=sp_context,
                **kwargs,
            )
            hidden_states = residual + hidden_states
        mixed = self.channel_mixer.decode_step(hidden_states, self.post_attention_layernorm) if fused else None
        chunk_size = getattr(self.config, "mlp_chunk_size", None)  # read here: it may be set after loading
        if mixed is not None:
            hidden_states = mixed
        elif chunk_size is None:
            hidden_states = hidden_states + self._mix_channels(hidden_states)
        else:
            hidden_states = hidden_states + chunked_over_tokens(self._mix_channels, chunk_size, hidden_states)
        return (hidden_states, attn_weights) if output_attentions else hidden_states


class LaspPreTrainedModel(PreTrainedModel):
    """Weight initialization, the attention implementations and the generation contract shared by the lasp
    models (the model builds its own `LaspCache`; generate() must not)."""

    config_class = LaspConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LaspDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    # Softmax layers pass a boolean [B, 1, T, P + T] mask, which flash-attention and flex kernels do not take.
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    # torch.compile(fullgraph=True) and torch.export trace the forward and the decode step on the PyTorch path
    # (tests/test_modeling_generation.py), but transformers reads this flag as "generate() can compile decoding
    # with a static cache", and a LaspCache is not static (nor are the Triton kernels' launch plans).
    _can_compile_fullgraph = False
    # The cache can roll its recurrent states back into the last forward call (LaspStateLayer), which is what
    # assisted and prompt-lookup decoding need after verifying candidates.
    _is_stateful = False

    @torch.no_grad()
    def _init_weights(self, module):
        """Normal(0, initializer_range) weights, zero biases, unit norm weights, and the derived buffers."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, LaspRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LaspLinearAttention) and module.decay is not None:
            # Non-persistent buffers are not in checkpoints: rebuild them (the model may have been made on
            # meta).
            init.copy_(module.decay, fixed_decay(self.config, module.layer_idx))
        elif isinstance(module, LaspRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(self.config))
        elif isinstance(module, LinearRotary):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, LinearLrpe):
            init.copy_(module.theta, module.initial_theta(*module.theta.shape))

    def fuse_projections(self):
        """Lay out each block's q / k / v (/ gate) projection weights, and its GLU's gate / up weights, as one
        tensor each (`parts_lasp.FusedRows`), so that inference (no gradients to them) on few rows (at most
        `parts_lasp.MAX_FUSED_ROWS`: decoding) computes each group in one matrix product: at one token per row a few
        large products read the weights faster than many small ones; a prompt's products are compute-bound, and
        take one product each.
        The parameters, their values and the state dict stay the same (each weight becomes a view of its group's
        tensor; no memory is added); training computes each projection on its own as before. A cast or move of
        the model undoes it. `generate` calls it. Returns the model."""
        for rows in self._fused_rows():
            rows.fuse()
        return self

    def unfuse_projections(self):
        """Undo `fuse_projections`: each projection weight gets its own tensor again. Returns the model."""
        for rows in self._fused_rows():
            rows.unfuse()
        return self

    def _fused_rows(self):
        for module in self.modules():
            for rows in (getattr(module, "qkvu", None), getattr(module, "gate_up", None)):
                if rows is not None:
                    yield rows

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # A DynamicCache cannot hold recurrent states: generate() gets a LaspCache instead (below).
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() makes a DynamicCache for most models; these get a LaspCache (assisted decoding needs the
        cache before the first forward)."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is not False and model_kwargs.get(_CACHE_FIELD) is None:
            model_kwargs[_CACHE_FIELD] = LaspCache(self.config.get_text_config(decoder=True))
        return result


def _packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor | None:
    """cu_seqlens (int32) of the documents of a packed row (B == 1) whose position_ids restart at 0, or
    None."""
    starts = (position_ids[0, 1:] == 0).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    T = position_ids.shape[1]
    bounds = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), T)])
    return bounds.to(torch.int32)


class LaspModel(LaspPreTrainedModel):
    """The decoder: embeddings, `num_hidden_layers` blocks, a final norm."""

    def __init__(self, config: LaspConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LaspDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = build_norm(config, config.hidden_size)
        self.has_full_attention = "full_attention" in config.layer_types
        self.rotary_emb = LaspRotaryEmbedding(config) if self.has_full_attention else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LaspCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        sp_context=None,
        **kwargs,
    ):
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): token ids (or pass `inputs_embeds`).
            attention_mask (`torch.Tensor` of shape `(B, P + T)`, *optional*): 1 for real tokens, 0 for
                padding (left or right). Real tokens get the same outputs as without the padding.
            position_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): positions for the rotary
                embeddings of full-attention layers and the position encoding of linear ones (defaults to the
                global positions: the cache length, plus the rank's offset under SP). With B == 1, positions
                that restart at 0 mark packed documents (as `DataCollatorWithFlattening` makes): states reset
                and attention stays inside each document.
            past_key_values (`LaspCache`, *optional*): the cache of a previous call (also accepted as
                `cache`).
            use_cache (`bool`, *optional*): return a `LaspCache` (defaults to `config.use_cache`).
            sp_context (`SequenceParallelContext`, *optional*): sequence-parallel group; each rank passes its
                slice.
            kwargs: `cu_seq_lens_q` (int `[N + 1]`, packed documents; takes precedence over position_ids),
                `cache_position`, `hidden_states_to_keep` (int, a prompt prefilled in chunks returns only
                the last n positions' hidden states when n > 0, see `prefill_in_chunks`), and anything else,
                passed on to the layers.
        """
        cache = kwargs.pop("cache", None)
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as `past_key_values` or `cache`, not both")
        cache = cache if cache is not None else past_key_values
        cache_position = kwargs.pop("cache_position", None)
        hidden_states_to_keep = kwargs.pop("hidden_states_to_keep", 0)
        cu_seqlens = kwargs.pop("cu_seq_lens_q", None)
        output_attentions = kwargs.pop("output_attentions", None)
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(name, None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.vocab_size, "input_ids")
            inputs_embeds = self.embed_tokens(input_ids)
            embedding_scale = getattr(self.config, "embedding_scale", 1.0)
            if embedding_scale != 1.0:
                inputs_embeds = inputs_embeds * embedding_scale
        B, T = inputs_embeds.shape[:2]
        if B == 0 or T == 0:
            raise ValueError(f"the batch must hold at least one row of at least one token, got B = {B}, T = {T}")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states

        if cache is not None and not isinstance(cache, LaspCache):
            raise ValueError(
                "past_key_values must be a LaspCache (the model makes one with use_cache=True), "
                f"got {type(cache).__name__}"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "attention_mask must be 2-D [B, P + T] (1 = token, 0 = padding), "
                f"got {attention_mask.dim()}-D"
            )
        # Eager: a mask of all ones takes the unpadded path. Traced (torch.compile / torch.export), that test
        # would be a data-dependent branch: any mask takes the padded path, which gives the same outputs.
        padding = attention_mask is not None and (
            torch.compiler.is_compiling() or not bool(attention_mask.all())
        )

        if cu_seqlens is None and position_ids is not None and sp_context is not None:
            # A slice cannot tell where the other ranks' documents start: the caller must pass the full
            # boundaries.
            starts_inside = bool((position_ids[:, 1:] == 0).any())
            starts_at_cut = sp_context.rank > 0 and bool((position_ids[:, 0] == 0).any())
            if starts_inside or starts_at_cut:
                raise ValueError(
                    "under sequence parallelism packed documents need cu_seq_lens_q (the full sequence's "
                    "boundaries); "
                    "the position_ids of one slice cannot give them"
                )
        elif cu_seqlens is None and position_ids is not None and B == 1 and T > 1 and not padding:
            cu_seqlens = _packed_cu_seqlens(position_ids)
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(
                    f"packed sequences (cu_seq_lens_q / restarting position_ids) need batch size 1, got {B}"
                )
            if cache is not None or use_cache:
                raise ValueError("packed sequences cannot be used with a cache; pass use_cache=False")
            if padding:
                raise ValueError("packed sequences take no padding attention_mask")
            cu_seqlens = cu_seqlens.to(device=inputs_embeds.device, dtype=torch.int32)
        if sp_context is not None:
            if padding:
                raise ValueError(
                    "sequence parallelism does not take padded batches; pack the sequences instead"
                )
            if (cache is None and use_cache) or (cache is not None and cache.get_seq_length() > 0):
                # An empty cache passed in is a prefill under SP (lasp_hf.parallel.prefill).
                raise ValueError(
                    "sequence parallelism does not use a cache (pass use_cache=False), except an empty "
                    "LaspCache passed as past_key_values to prefill a prompt (see lasp_hf.parallel.prefill)"
                )

        if use_cache is None:
            # As transformers' recurrent models: no cache while training, nor for packed or sharded sequences.
            use_cache = (
                self.config.use_cache and not self.training and cu_seqlens is None and sp_context is None
            )
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and use_cache:
            logger.warning_once(
                "use_cache=True is incompatible with gradient checkpointing; setting use_cache=False."
            )
            use_cache = False
        if use_cache and cache is None:
            cache = LaspCache(self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[1] not in (T, past_length + T):
            raise ValueError(
                f"attention_mask must cover the cached and new tokens ({past_length} + {T}) "
                f"or the new ones ({T}), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        chunk_size = getattr(self.config, "prompt_chunk_size", None)  # read here: it may be set later
        if cache is not None and sp_context is None and chunk_size is not None and T > chunk_size:
            if input_ids is not None:
                inputs_embeds = None  # chunks of ids embed themselves: drop the whole prompt's embeddings
            output = prefill_in_chunks(
                self,
                chunk_size,
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache_position=cache_position,
                cache=cache,
                hidden_states_to_keep=hidden_states_to_keep,
                output_hidden_states=output_hidden_states,
                cache_field=_CACHE_FIELD,
                **kwargs,
            )
            return output if return_dict is not False else output.to_tuple()

        full_mask = None
        if attention_mask is not None:
            full_mask = attention_mask.bool()
            if full_mask.shape[1] == T and past_length > 0:
                full_mask = torch.cat([full_mask.new_ones(B, past_length), full_mask], dim=1)
        linear_mask = full_mask[:, -T:] if padding else None

        if position_ids is None:
            if cache_position is not None and not padding:
                position_ids = cache_position.view(1, -1).expand(B, -1)
            elif padding:
                position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                offset = past_length + (sp_context.rank * T if sp_context is not None else 0)
                position_ids = (
                    torch.arange(offset, offset + T, device=inputs_embeds.device).unsqueeze(0).expand(B, -1)
                )

        position_embeddings, attn_mask = None, None
        if self.has_full_attention:
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
            if sp_context is None and cu_seqlens is None and (padding or (past_length > 0 and T > 1)):
                attn_mask = self._softmax_mask(full_mask, B, T, past_length, inputs_embeds.device)
            elif T == 1:
                # A fixed-shape decoding cache (generation_lasp.LaspStaticCache) marks its valid key slots.
                attn_mask = getattr(cache, "key_mask", None)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                # A `(B, H, T, P + T)` tensor for softmax layers, None for linear ones (as transformers' hybrids).
                hidden_states, attn_weights = layer(
                    hidden_states,
                    linear_mask=linear_mask,
                    attn_mask=attn_mask,
                    position_embeddings=position_embeddings,
                    cu_seqlens=cu_seqlens,
                    cache=cache,
                    sp_context=sp_context,
                    output_attentions=True,
                    **kwargs,
                )
                all_attentions += (attn_weights,)
                continue
            hidden_states = layer(
                hidden_states,
                linear_mask=linear_mask,
                attn_mask=attn_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cu_seqlens=cu_seqlens,
                cache=cache,
                sp_context=sp_context,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None:
            # Under SP (a prefill) every rank's cache holds the whole prompt: W slices of T tokens.
            cache.count_tokens(T * (sp_context.world_size if sp_context is not None else 1))

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{_CACHE_FIELD: cache},
        )
        return output if return_dict is not False else output.to_tuple()

    @staticmethod
    def _softmax_mask(full_mask, B, T, past_length, device):
        """Boolean `[B, 1, T, P + T]`: causal, no padded key; every query also sees itself, so a padded
        query's row is never empty (no NaN; its output is unused)."""
        key_pos = torch.arange(past_length + T, device=device)
        query_pos = key_pos[past_length:]
        allowed = key_pos[None, :] <= query_pos[:, None]  # [T, P + T]
        if full_mask is None:
            return allowed[None, None].expand(B, 1, T, past_length + T)
        allowed = allowed[None] & full_mask[:, None, :]
        allowed = allowed | (key_pos[None, :] == query_pos[:, None])[None]
        return allowed[:, None]


def _keep_last(hidden_states, logits_to_keep):
    if isinstance(logits_to_keep, int):
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:]
    return hidden_states[:, logits_to_keep]


class LaspForCausalLM(LaspPreTrainedModel, GenerationMixin):
    """`LaspModel` with a language-modeling head and a chunked cross-entropy loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LaspConfig):
        super().__init__(config)
        self.model = LaspModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def generate(self, *args, **kwargs):
        """transformers' `generate`; with `cache_implementation="static"`, greedy decoding whose one-token
        step runs as a CUDA graph on a GPU (`generation_lasp.generate_static`: ids, attention_mask,
        max_new_tokens, eos / pad token ids). Either way the projections are fused first (`fuse_projections`)."""
        self.fuse_projections()
        if kwargs.get("cache_implementation") == "static":
            from .generation_lasp import generate_static

            kwargs.pop("cache_implementation")
            inputs = kwargs.pop("inputs", kwargs.pop("input_ids", None))
            if inputs is not None:
                args = (inputs, *args)
            return generate_static(self, *args, **kwargs)
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # save_pretrained maps only this class in config.json's auto_map; add the base model so that
        # AutoModel.from_pretrained(..., trust_remote_code=True) loads a saved causal LM too.
        if getattr(self, "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault(
                "AutoModel", f"{type(self.model).__module__.split('.')[-1]}.{type(self.model).__name__}"
            )
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LaspCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        sp_context=None,
        loss_reduction: str = "mean",
        **kwargs,
    ):
        r"""
        Args (besides `LaspModel.forward`'s):
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): targets, shifted inside (position t
                predicts labels[t + 1]); -100 is ignored.
            shift_labels (`torch.LongTensor` of shape `(B, T)`, *optional*, in kwargs): targets already
                shifted; take precedence over `labels` (required under sequence parallelism).
            num_items_in_batch (*optional*, in kwargs): the mean divides the summed loss by it (as
                transformers' `ForCausalLMLoss`) instead of by this batch's valid-label count.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0): logits for the last n
                positions (int, 0 = all) or for the given indices. When a loss is computed, logits are
                returned only if this is not 0: the loss itself never materializes `[T, vocab]` logits (see
                `chunked_cross_entropy`).
            loss_reduction (`str`, *optional*, defaults to `"mean"`): `"sum"` returns the summed token loss
                (the sequence-parallel trainer reduces it over ranks itself).
        """
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        return_dict = kwargs.pop("return_dict", None)
        if loss_reduction not in _LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if sp_context is not None and labels is not None and shift_labels is None:
            raise ValueError(
                "under sequence parallelism pass shift_labels (shifted on the full sequence before it is "
                "cut), "
                "not labels: shifting a slice would lose the prediction at each cut"
            )
        if labels is None and shift_labels is None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            # A prompt prefilled in chunks then keeps only these positions' hidden states (O(chunk) memory).
            kwargs["hidden_states_to_keep"] = logits_to_keep
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            sp_context=sp_context,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state

        loss, logits = None, None
        wants_loss = labels is not None or shift_labels is not None
        if wants_loss:
            check_token_ids(labels if shift_labels is None else shift_labels, self.config.vocab_size,
                            "labels" if shift_labels is None else "shift_labels", ignore_index)
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            loss, num_valid = chunked_cross_entropy(
                hidden_states,
                self.lm_head.weight,
                shift_labels,
                chunk_size=self.config.loss_chunk_size,
                reduction="sum",
                ignore_index=ignore_index,
            )
            if loss_reduction == "mean":
                denominator = num_items_in_batch if num_items_in_batch is not None else num_valid
                # A step without targets (every label -100) sums to 0: dividing by at least 1 makes it contribute
                # loss 0 and zero gradients instead of 0 / 0 = NaN, as the sequence-parallel path does.
                if torch.is_tensor(denominator):
                    denominator = denominator.to(loss.device).clamp(min=1)
                else:
                    denominator = max(denominator, 1)
                loss = loss / denominator
        if not wants_loss or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            logits = self.lm_head(_keep_last(hidden_states, logits_to_keep))

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = ["LaspForCausalLM", "LaspModel", "LaspPreTrainedModel", "chunked_cross_entropy"]
