"""The lasp model family: linear-attention causal LMs (TransNormerLLM's lightning attention, basic linear
attention, gated linear attention) with optional softmax-attention layers, for Hugging Face Transformers.

Shapes: B batch, T tokens (this call), P tokens already in the cache, H heads, D head dim.

The model is written for one device. Sequence parallelism reaches it only through `sp_context`, which the
token mixers hand to `lasp_hf.linear_attention` (linear layers) or `sp_softmax_attention` (softmax layers);
each rank then passes its own slice of `input_ids` / `position_ids` / `shift_labels` and the full
`cu_seq_lens_q`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from lasp_hf.ops import linear_attention, linear_attention_step

from .cache_lasp import LaspCache
from .configuration_lasp import LaspConfig
from .loss_lasp import chunked_cross_entropy

logger = logging.get_logger(__name__)

# transformers renamed the outputs' cache field from `past_key_values` to `cache` during 5.x.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_LOSS_REDUCTIONS = ("mean", "sum")


class LaspRMSNorm(nn.Module):
    """RMSNorm with a learned weight (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LaspSRMSNorm(nn.Module):
    """TransNormerLLM's simple RMSNorm: x / rms(x), no weight (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def build_norm(config: LaspConfig, dim: int) -> nn.Module:
    norm_class = LaspRMSNorm if config.norm_type == "rmsnorm" else LaspSRMSNorm
    return norm_class(dim, eps=config.rms_norm_eps)


class LaspGLU(nn.Module):
    """Channel mixer: `down(act(gate(x)) * up(x))`, act = identity (SGLU, TransNormerLLM) or SiLU (SwiGLU)."""

    def __init__(self, config: LaspConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = nn.SiLU() if config.channel_mixer == "swiglu" else nn.Identity()

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def lightning_decay(config: LaspConfig, layer_idx: int) -> torch.Tensor:
    """TransNormerLLM's fixed log decay of layer l of L: g_h = -s_h * (1 - l / (L - 1) + 1e-5), with the ALiBi
    slopes s_h = 2^(-8 (h + 1) / H). Float32 `[H]`."""
    H, L = config.num_attention_heads, config.num_hidden_layers
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32)
    depth = layer_idx / (L - 1) if L > 1 else 0.0
    return -slopes * (1.0 - depth + 1e-5)


class LaspLinearAttention(nn.Module):
    """Linear-attention token mixer; `config.token_mixer` picks the kind:

    - "lightning" (TransNormerLLM): q, k = silu(W x), v = W x; fixed per-head decay (`lightning_decay`);
      scale 1; norm on the output, times an output gate act(W_u x).
    - "linear" (the LASP paper's basic linear attention): q, k = phi(W x) with phi = elu + 1 or identity;
      no decay; scale D^-0.5; norm on the output.
    - "gated" (gated linear attention): g_t = logsigmoid(W2 W1 x_t + b) / normalizer per token and head;
      scale D^-0.5; norm on the output, times an output gate.

    The output norm (the config's norm, over all heads) stands in for linear attention's denominator, as in
    TransNormer, and keeps the unnormalized sum of outer products in range.

    Padding (`mask` False): k and v are zeroed and g set to 0 there, so a padded token neither adds to the
    state nor decays it. Left pads keep the state exactly zero until the first real token; right pads leave
    it (and the cached state) equal to the state after the last real token.
    """

    def __init__(self, config: LaspConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kind = config.token_mixer
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_norm = build_norm(config, width)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.u_proj = None
        if self.kind in ("lightning", "gated"):
            self.u_proj = nn.Linear(config.hidden_size, width, bias=False)
            self.u_act = nn.Sigmoid() if config.output_gate_act == "sigmoid" else nn.SiLU()
        self.decay_proj = None
        if self.kind == "gated":
            self.decay_proj = nn.Sequential(
                nn.Linear(config.hidden_size, config.gate_low_rank_dim, bias=False),
                nn.Linear(config.gate_low_rank_dim, self.num_heads, bias=True),
            )
        if self.kind == "lightning":
            self.register_buffer("decay", lightning_decay(config, layer_idx), persistent=False)
        else:
            self.decay = None
        self.scale = 1.0 if self.kind == "lightning" else self.head_dim ** -0.5

    def _apply(self, fn, recurse=True):
        # Keep the fixed decay in float32 when the model is cast to bf16 / fp16 (bf16 would round it by 2^-9).
        super()._apply(fn, recurse)
        if self.decay is not None and self.decay.dtype != torch.float32:
            self.decay = self.decay.float()
        return self

    def _log_decay(self, x):
        if self.kind == "lightning":
            return self.decay.float()
        if self.kind == "gated":
            return F.logsigmoid(self.decay_proj(x).float()) / self.config.gate_logit_normalizer
        return None

    def forward(self, hidden_states, mask=None, cu_seqlens=None, cache=None, sp_context=None, **kwargs):
        B, T, _ = hidden_states.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        if self.kind == "lightning":
            q, k = F.silu(q), F.silu(k)
        elif self.kind == "linear" and self.config.feature_map == "elu":
            q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        g = self._log_decay(hidden_states)
        if mask is not None:
            pad = ~mask[:, :, None]                                   # [B, T, 1]
            k = k.masked_fill(pad[..., None], 0.0)
            v = v.masked_fill(pad[..., None], 0.0)
            if g is not None:
                g = g.expand(B, T, self.num_heads).masked_fill(pad, 0.0)

        state = cache.get_state(self.layer_idx) if cache is not None else None
        if state is not None and T == 1:
            # One decoding token: O(1) in the context length.
            g_step = g[:, 0] if (g is not None and g.dim() == 3) else g
            o, new_state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g_step, state=state, scale=self.scale)
            o = o[:, None]
        else:
            o, new_state = linear_attention(
                q, k, v, g, scale=self.scale, initial_state=state, output_final_state=cache is not None,
                cu_seqlens=cu_seqlens, sp_group=sp_context,
                sp_mode=sp_context.mode if sp_context is not None else "ring",
            )
        if cache is not None:
            cache.set_state(new_state, self.layer_idx)

        o = self.o_norm(o.reshape(B, T, -1))
        if self.u_proj is not None:
            o = self.u_act(self.u_proj(hidden_states)) * o
        return self.o_proj(o)


class LaspRotaryEmbedding(nn.Module):
    """Rotary position embeddings (rotate-half convention) for the full-attention layers."""

    def __init__(self, config: LaspConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.compute_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the frequencies in float32 when the model is cast to a half type.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.inv_freq.float()
        return self

    @staticmethod
    def compute_inv_freq(config: LaspConfig) -> torch.Tensor:
        dim = config.head_dim
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    @torch.no_grad()
    def forward(self, x, position_ids):
        """position_ids `[B, T]` -> cos, sin `[B, T, D]` in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q, k `[B, T, H, D]`; cos, sin `[B, T, D]`."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention in plain PyTorch. query `[B, H, Tq, D]`, key/value `[B, H, Tk, D]`; attention_mask is
    None (causal, queries aligned to the last keys) or boolean `[B, 1, Tq, Tk]` (True = attend)."""
    weights = (query @ key.transpose(2, 3)) * scaling
    Tq, Tk = query.shape[2], key.shape[2]
    if attention_mask is None and Tq > 1:
        attention_mask = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(diagonal=Tk - Tq)
    if attention_mask is not None:
        weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
    probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


class LaspSoftmaxAttention(nn.Module):
    """Causal softmax attention with RoPE for the "full_attention" layers of hybrids, through transformers'
    attention interface (sdpa by default, eager as fallback). Under SP it calls `sp_softmax_attention`."""

    def __init__(self, config: LaspConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = 1
        self.is_causal = True
        self.scaling = self.head_dim ** -0.5
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)

    def _attention_interface(self) -> Callable:
        implementation = self.config._attn_implementation
        if implementation in (None, "eager"):
            return eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS[implementation]

    def forward(self, hidden_states, position_embeddings=None, attn_mask=None, cu_seqlens=None, cache=None,
                sp_context=None, **kwargs):
        B, T, _ = hidden_states.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)

        if sp_context is not None:
            from lasp_hf.parallel.attention import sp_softmax_attention

            o = sp_softmax_attention(q, k, v, sp_context=sp_context, cu_seqlens=cu_seqlens, scale=self.scaling)
            return self.o_proj(o.reshape(B, T, -1))

        q, k, v = (x.transpose(1, 2) for x in (q, k, v))              # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = self._attention_interface()
        if cu_seqlens is not None:
            # Packed documents: one causal call per document, so none attends across a boundary.
            bounds = cu_seqlens.tolist()
            outs = [
                attention(self, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, dropout=0.0, scaling=self.scaling)[0]
                for s, e in zip(bounds[:-1], bounds[1:]) if e > s
            ]
            o = torch.cat(outs, dim=1)
        else:
            o = attention(self, q, k, v, attn_mask, dropout=0.0, scaling=self.scaling)[0]
        return self.o_proj(o.reshape(B, T, -1))


class LaspDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)), then x + GLU(norm(x))."""

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

    def forward(self, hidden_states, linear_mask=None, attn_mask=None, position_embeddings=None, cu_seqlens=None,
                cache=None, sp_context=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.layer_type == "full_attention":
            hidden_states = self.token_mixer(
                hidden_states, position_embeddings=position_embeddings, attn_mask=attn_mask, cu_seqlens=cu_seqlens,
                cache=cache, sp_context=sp_context, **kwargs,
            )
        else:
            hidden_states = self.token_mixer(
                hidden_states, mask=linear_mask, cu_seqlens=cu_seqlens, cache=cache, sp_context=sp_context, **kwargs,
            )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.channel_mixer(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class LaspPreTrainedModel(PreTrainedModel):
    config_class = LaspConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LaspDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    # The cache folds past tokens into recurrent states: it cannot be cropped (no assisted decoding).
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
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
            # Non-persistent buffers are not in checkpoints: rebuild them (the model may have been made on meta).
            init.copy_(module.decay, lightning_decay(self.config, module.layer_idx))
        elif isinstance(module, LaspRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(self.config))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model builds its own LaspCache on the first forward.
        return False


def _packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor | None:
    """cu_seqlens (int32) of the documents of a packed row (B == 1) whose position_ids restart at 0, or None."""
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
            attention_mask (`torch.Tensor` of shape `(B, P + T)`, *optional*): 1 for real tokens, 0 for padding (left
                or right). Real tokens get the same outputs as without the padding.
            position_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): positions for the rotary embeddings of
                full-attention layers. With B == 1, positions that restart at 0 mark packed documents (as
                `DataCollatorWithFlattening` makes): states reset and attention stays inside each document.
            past_key_values (`LaspCache`, *optional*): the cache of a previous call (also accepted as `cache`).
            use_cache (`bool`, *optional*): return a `LaspCache` (defaults to `config.use_cache`).
            sp_context (`SequenceParallelContext`, *optional*): sequence-parallel group; each rank passes its slice.
            kwargs: `cu_seq_lens_q` (int `[N + 1]`, packed documents; takes precedence over position_ids),
                `cache_position`, and anything else, passed on to the layers.
        """
        cache = kwargs.pop("cache", None)
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as `past_key_values` or `cache`, not both")
        cache = cache if cache is not None else past_key_values
        cache_position = kwargs.pop("cache_position", None)
        cu_seqlens = kwargs.pop("cu_seq_lens_q", None)
        for name in ("cu_seq_lens_k", "max_length_q", "max_length_k", "output_attentions"):
            kwargs.pop(name, None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]

        if cache is not None and not isinstance(cache, LaspCache):
            raise ValueError(
                f"past_key_values must be a LaspCache (the model makes one with use_cache=True), got {type(cache).__name__}"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [B, P + T] (1 = token, 0 = padding), got {attention_mask.dim()}-D")
        padding = attention_mask is not None and not bool(attention_mask.all())

        if cu_seqlens is None and position_ids is not None and sp_context is not None:
            # A slice cannot tell where the other ranks' documents start: the caller must pass the full boundaries.
            restarts = bool((position_ids[:, 1:] == 0).any()) or (sp_context.rank > 0 and bool((position_ids[:, 0] == 0).any()))
            if restarts:
                raise ValueError(
                    "under sequence parallelism packed documents need cu_seq_lens_q (the full sequence's boundaries); "
                    "the position_ids of one slice cannot give them"
                )
        elif cu_seqlens is None and position_ids is not None and B == 1 and T > 1 and not padding:
            cu_seqlens = _packed_cu_seqlens(position_ids)
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"packed sequences (cu_seq_lens_q / restarting position_ids) need batch size 1, got {B}")
            if cache is not None or use_cache:
                raise ValueError("packed sequences cannot be used with a cache; pass use_cache=False")
            if padding:
                raise ValueError("packed sequences take no padding attention_mask")
            cu_seqlens = cu_seqlens.to(device=inputs_embeds.device, dtype=torch.int32)
        if sp_context is not None:
            if padding:
                raise ValueError("sequence parallelism does not take padded batches; pack the sequences instead")
            if cache is not None or use_cache:
                raise ValueError("sequence parallelism does not use a cache; pass use_cache=False")

        if use_cache is None:
            # As transformers' recurrent models: no cache while training, nor for packed or sharded sequences.
            use_cache = self.config.use_cache and not self.training and cu_seqlens is None and sp_context is None
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; setting use_cache=False.")
            use_cache = False
        if use_cache and cache is None:
            cache = LaspCache(self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[1] not in (T, past_length + T):
            raise ValueError(
                f"attention_mask must cover the cached and new tokens ({past_length} + {T}) or the new ones ({T}), "
                f"got shape {tuple(attention_mask.shape)}"
            )

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
                position_ids = torch.arange(offset, offset + T, device=inputs_embeds.device).unsqueeze(0).expand(B, -1)

        position_embeddings, attn_mask = None, None
        if self.has_full_attention:
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
            if sp_context is None and cu_seqlens is None and (padding or (past_length > 0 and T > 1)):
                attn_mask = self._softmax_mask(full_mask, B, T, past_length, inputs_embeds.device)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states, linear_mask=linear_mask, attn_mask=attn_mask, position_embeddings=position_embeddings,
                cu_seqlens=cu_seqlens, cache=cache, sp_context=sp_context, **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None:
            cache.num_seen_tokens += T

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{_CACHE_FIELD: cache}
        )
        return output if return_dict is not False else output.to_tuple()

    @staticmethod
    def _softmax_mask(full_mask, B, T, past_length, device):
        """Boolean `[B, 1, T, P + T]`: causal, no padded key; every query also sees itself, so a padded query's
        row is never empty (no NaN; its output is unused)."""
        key_pos = torch.arange(past_length + T, device=device)
        query_pos = key_pos[past_length:]
        allowed = key_pos[None, :] <= query_pos[:, None]                         # [T, P + T]
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
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): targets, shifted inside (position t predicts
                labels[t + 1]); -100 is ignored.
            shift_labels (`torch.LongTensor` of shape `(B, T)`, *optional*, in kwargs): targets already shifted;
                take precedence over `labels` (required under sequence parallelism).
            num_items_in_batch (*optional*, in kwargs): the mean divides the summed loss by it (as transformers'
                `ForCausalLMLoss`) instead of by this batch's valid-label count.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0): logits for the last n positions
                (int, 0 = all) or for the given indices. When a loss is computed, logits are returned only if this
                is not 0: the loss itself never materializes `[T, vocab]` logits (see `chunked_cross_entropy`).
            loss_reduction (`str`, *optional*, defaults to `"mean"`): `"sum"` returns the summed token loss (the
                sequence-parallel trainer reduces it over ranks itself).
        """
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        return_dict = kwargs.pop("return_dict", None)
        if loss_reduction not in _LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if sp_context is not None and labels is not None and shift_labels is None:
            raise ValueError(
                "under sequence parallelism pass shift_labels (shifted on the full sequence before it is cut), "
                "not labels: shifting a slice would lose the prediction at each cut"
            )
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            return_dict=True, sp_context=sp_context, **kwargs,
        )
        hidden_states = outputs.last_hidden_state

        loss, logits = None, None
        wants_loss = labels is not None or shift_labels is not None
        if wants_loss:
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            loss, num_valid = chunked_cross_entropy(
                hidden_states, self.lm_head.weight, shift_labels, chunk_size=self.config.loss_chunk_size,
                reduction="sum", ignore_index=ignore_index,
            )
            if loss_reduction == "mean":
                denominator = num_items_in_batch if num_items_in_batch is not None else num_valid
                if torch.is_tensor(denominator):
                    denominator = denominator.to(loss.device)
                loss = loss / denominator
        if not wants_loss or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            logits = self.lm_head(_keep_last(hidden_states, logits_to_keep))

        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = ["LaspForCausalLM", "LaspModel", "LaspPreTrainedModel", "chunked_cross_entropy"]
