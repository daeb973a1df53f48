"""Configuration of the lasp model family (model_type "lasp"): linear-attention causal LMs with an
optional share of softmax-attention layers (hybrids)."""

import difflib
import inspect

from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

TOKEN_MIXERS = ("lightning", "linear", "gated", "gla")
LAYER_TYPES = ("linear_attention", "full_attention")
CHANNEL_MIXERS = ("sglu", "swiglu")
NORM_TYPES = ("rmsnorm", "srmsnorm")
FEATURE_MAPS = ("elu", "identity")
OUTPUT_GATE_ACTS = ("sigmoid", "silu", "identity")
QK_ACTIVATIONS = ("silu", "elu", "identity")
POSITION_ENCODINGS = ("none", "lrpe", "rope")
DECAY_SCHEDULES = ("lightning", "lightning_alibi", "retnet", "none")
OUTPUT_NORMS = ("all_heads", "per_head")
# Keys that `PretrainedConfig` of some transformers version writes or reads, besides its __init__ arguments: a
# config.json written by another version may hold them, and they are not misspellings of LaspConfig fields.
_HF_CONFIG_KEYS = frozenset((
    "_attn_implementation", "_commit_hash", "_name_or_path", "add_cross_attention", "architectures", "auto_map",
    "bad_words_ids", "base_model_pp_plan", "base_model_tp_plan", "begin_suppress_tokens", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample", "dtype",
    "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id",
    "length_penalty", "max_length", "min_length", "model_type", "no_repeat_ngram_size", "num_beam_groups",
    "num_beams", "num_labels", "num_return_sequences", "output_attentions", "output_hidden_states",
    "output_scores", "prefix", "problem_type", "pruned_heads", "quantization_config", "remove_invalid_values",
    "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k",
    "top_p", "torch_dtype", "torchscript", "transformers_version", "typical_p", "use_bfloat16", "use_return_dict",
))


class LaspConfig(PretrainedConfig):
    r"""
    Configuration of a [`LaspModel`] / [`LaspForCausalLM`]: a decoder of pre-norm residual blocks, each a
    token mixer (linear attention of one of three kinds, or causal softmax attention for hybrids) and a
    channel mixer (GLU).
    The defaults give a small TransNormerLLM-style model.

    Args:
        vocab_size (`int`, *optional*, defaults to 64000):
            Number of tokens in the vocabulary.
        hidden_size (`int`, *optional*, defaults to 1024):
            Width of the residual stream.
        num_hidden_layers (`int`, *optional*, defaults to 24):
            Number of decoder blocks.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Number of heads of every token mixer.
        head_dim (`int`, *optional*, defaults to `hidden_size // num_attention_heads`):
            Width of one head (queries, keys and values alike).
        intermediate_size (`int`, *optional*, defaults to 2816):
            Width of the channel mixer's hidden layer.
        token_mixer (`str`, *optional*, defaults to `"lightning"`):
            Kind of linear attention: `"lightning"` (TransNormerLLM: fixed per-head decay, output gate, scale
            1), `"linear"` (the LASP paper's basic linear attention: feature map, no decay), `"gated"` (a
            decay per token and head from a learned low-rank projection) or `"gla"` (GLA: a decay per token and
            key channel from the same low-rank projection, `[B, T, H, head_dim]`, output gate, scale
            `head_dim ** -0.5`; fla's GLA with `value_head_dim = 2 * head_dim`, `output_norm="per_head"`,
            `output_gate_act="silu"`, `norm_type="rmsnorm"`, `channel_mixer="swiglu"`).
        layer_types (`list[str]`, *optional*):
            One of `"linear_attention"` / `"full_attention"` per layer; defaults to all `"linear_attention"`.
            `"full_attention"` layers use causal softmax attention with rotary position embeddings.
        channel_mixer (`str`, *optional*, defaults to `"sglu"`):
            `"sglu"` (TransNormerLLM's simple GLU, `(W1 x * W2 x) W3`, no activation) or `"swiglu"`.
        norm_type (`str`, *optional*, defaults to `"srmsnorm"`):
            `"rmsnorm"` (with a learned weight) or `"srmsnorm"` (simple RMS norm, no weight).
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the norms.
        feature_map (`str`, *optional*, defaults to `"elu"`):
            Feature map on queries and keys of the `"linear"` token mixer: `"elu"` (elu + 1) or `"identity"`.
        output_gate_act (`str`, *optional*, defaults to `"sigmoid"`):
            Activation of the output gate of the `"lightning"`, `"gated"` and `"gla"` token mixers: `"sigmoid"`,
            `"silu"` or `"identity"` (TransNormerLLM's released models multiply by the raw projection u).
        gate_low_rank_dim (`int`, *optional*, defaults to 16):
            Rank of the decay projection of the `"gated"` and `"gla"` token mixers.
        gate_logit_normalizer (`float`, *optional*, defaults to 16.0):
            The `"gated"` and `"gla"` log decay is `logsigmoid(W2 W1 x + b) / gate_logit_normalizer` (as in GLA).
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the rotary embeddings of the `"full_attention"` layers (and of `position_encoding="rope"`).
        max_position_embeddings (`int`, *optional*, defaults to 2048):
            Longest sequence the model is meant for (informational: linear layers have no limit).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initializer of the weights.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the output projection shares the input embedding's weight.
        loss_chunk_size (`int`, *optional*, defaults to 1024):
            Tokens per chunk of the chunked cross-entropy: the `[T, vocab_size]` logits are never materialized
            when a loss is computed, only `[loss_chunk_size, vocab_size]` at a time (forward and backward).
        mlp_chunk_size (`int`, *optional*):
            Tokens per chunk of the channel mixer: when set, each block's norm + GLU runs over the token axis in
            chunks of this many tokens, each under a non-reentrant activation checkpoint while gradients are
            on, so its `[T, intermediate_size]` tensors exist for one chunk at a time in forward and backward
            (the outputs are the same). Costs one more GLU forward per step; meant for long sequences where
            memory binds. `None` (the default) runs it on all tokens at once.
        attention_chunk_size (`int`, *optional*):
            Tokens per chunk of the token-wise parts of each linear-attention block, while gradients are on and
            a call has more tokens than this: the input norm, the q / k / v / gate / decay projections, feature
            maps and padding mask before the op, and the output norm, gate and o_proj after it, run in chunks
            of this many tokens, each under a non-reentrant activation checkpoint, so the backward keeps only
            the block input, q, k, v (and the per-token decay) and the op's output, not the projections'
            pre-activations or the normed copies (the outputs are the same). The op itself always sees all
            tokens of the call. Costs one more forward of the block's projections per step. Softmax-attention
            layers of hybrids are not chunked. A separate field from `mlp_chunk_size` (not one shared
            `token_chunk_size`) so that configs and scripts that set `mlp_chunk_size` keep their meaning and
            each half can be chunked on its own. `None` (the default) runs them on all tokens at once.
        value_head_dim (`int`, *optional*, defaults to `head_dim`):
            Width of one head's values (and of the output norm, gate and o_proj input per head) in linear-attention
            layers; fla's RetNet uses `2 * head_dim`.
        qk_activation (`str`, *optional*):
            Activation on queries and keys of linear-attention layers: `"silu"`, `"elu"` (elu + 1) or `"identity"`.
            Defaults to the token mixer's own (`"silu"` for `"lightning"`, `feature_map` for `"linear"`, identity
            for `"gated"` and `"gla"`).
        position_encoding (`str`, *optional*, defaults to `"none"`):
            Position encoding of q and k inside linear-attention layers, at each token's global position (the
            position in the unsharded sequence under sequence parallelism, the cache length plus the offset in
            decoding): `"none"`, `"lrpe"` (TransNormerLLM's learned relative position encoding,
            `[x cos(theta n), x sin(theta n)]` with a learned `theta` `[H, head_dim]`; the key width doubles) or
            `"rope"` (rotary, rotate-half convention, base `rope_theta`, as fla's RetNet).
        position_encoding_layers (`list[int]`, *optional*):
            Indices of the layers that use `position_encoding`; defaults to every linear-attention layer
            (TransNormerLLM uses LRPE on the layers its `linear_use_lrpe_list` marks).
        decay_schedule (`str`, *optional*):
            Fixed per-head log decay of the `"lightning"` token mixer: `"lightning"` (the default:
            `-2^(-8 (h + 1) / H) * (1 - l / (L - 1) + 1e-5)` for layer l of L), `"lightning_alibi"` (the same with
            ALiBi's slopes for any head count, interleaved when H is not a power of two, as TransNormerLLM's
            released code; equal to `"lightning"` for powers of two), `"retnet"` (`log(1 - 2^(-5 - h))` in every
            layer) or `"none"`.
        attention_scale (`float`, *optional*):
            Scale of q in linear-attention layers; defaults to 1 for `"lightning"` and `head_dim ** -0.5`
            otherwise (fla's RetNet: `head_dim ** -0.5`).
        output_norm (`str`, *optional*, defaults to `"all_heads"`):
            Output norm of linear-attention layers: `"all_heads"` (one norm over all heads' channels, as
            TransNormer) or `"per_head"` (over each head's `value_head_dim` channels, one weight shared by the
            heads, as fla's RetNet).
        embedding_scale (`float`, *optional*, defaults to 1.0):
            Factor on the token embeddings looked up from `input_ids` (TransNormerLLM: `sqrt(hidden_size)`); the
            output head (tied or not) is not scaled.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether the model returns its cache (recurrent states, and keys/values of full-attention layers).
        pad_token_id (`int`, *optional*):
            Padding token id.
        bos_token_id (`int`, *optional*, defaults to 1):
            Beginning-of-sequence token id.
        eos_token_id (`int`, *optional*, defaults to 2):
            End-of-sequence token id.
        prompt_chunk_size (`int`, *optional*, defaults to 16384):
            Tokens per chunk when a prompt runs with a cache (`generate`, or `forward` with `use_cache=True` /
            `past_key_values`): a longer prompt runs in chunks of this many tokens, the recurrent states (and
            the keys / values of full-attention layers) carried from chunk to chunk through the cache, so the
            activations exist for one chunk at a time and peak memory is bounded by the chunk, not the prompt.
            The results are those of one call on the whole prompt (to rounding). With `logits_to_keep=n > 0`
            (`generate` asks for 1) only the last n hidden states are kept; asking for all logits concatenates
            the chunks' outputs and materializes `[T, vocab_size]` logits, as one call would. `None` runs
            every prompt whole. (Not `prefill_chunk_size`: `generate` would copy that into its GenerationConfig
            and run transformers' own chunking, which needs a cache that generate builds.)

    Example:

    ```python
    >>> from lasp_hf import LaspConfig, LaspForCausalLM
    >>> config = LaspConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
    >>> model = LaspForCausalLM(config)
    ```
    """

    model_type = "lasp"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    @classmethod
    def unknown_keys(cls, config_dict: dict) -> list[tuple[str, str | None]]:
        """The keys of `config_dict` that are no field of this config, each with the closest field (or None): a
        misspelled key (`intermediat_size`) would otherwise be ignored and the default used."""
        known = set(inspect.signature(cls.__init__).parameters) | set(
            inspect.signature(PretrainedConfig.__init__).parameters) | _HF_CONFIG_KEYS
        known -= {"self", "kwargs"}
        fields = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"})
        return [(key, next(iter(difflib.get_close_matches(key, fields, n=1, cutoff=0.6)), None))
                for key in config_dict if key not in known]

    @classmethod
    def describe_unknown_keys(cls, config_dict: dict) -> str:
        """`unknown_keys` in words, or "" when there is none."""
        return "; ".join(f"{key!r}" + (f" (did you mean {close!r}?)" if close else "")
                         for key, close in cls.unknown_keys(config_dict))

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As `PretrainedConfig.from_dict` (what `from_pretrained` calls), warning about keys that are no field of
        this config: a folder written by another version of lasp-hf may hold options this one does not know."""
        unknown = cls.describe_unknown_keys(config_dict)
        if unknown:
            logger.warning(f"LaspConfig: ignoring keys that are no field of this version's config: {unknown}")
        return super().from_dict(config_dict, **kwargs)

    def __init__(
        self,
        vocab_size=64000,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=8,
        head_dim=None,
        intermediate_size=2816,
        token_mixer="lightning",
        layer_types=None,
        channel_mixer="sglu",
        norm_type="srmsnorm",
        rms_norm_eps=1e-6,
        feature_map="elu",
        output_gate_act="sigmoid",
        gate_low_rank_dim=16,
        gate_logit_normalizer=16.0,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        initializer_range=0.02,
        tie_word_embeddings=False,
        loss_chunk_size=1024,
        mlp_chunk_size=None,
        attention_chunk_size=None,
        value_head_dim=None,
        qk_activation=None,
        position_encoding="none",
        position_encoding_layers=None,
        decay_schedule=None,
        attention_scale=None,
        output_norm="all_heads",
        embedding_scale=1.0,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        prompt_chunk_size=16384,
        **kwargs,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("intermediate_size", intermediate_size),
            ("gate_low_rank_dim", gate_low_rank_dim),
            ("loss_chunk_size", loss_chunk_size),
        ):
            _check_positive_int(name, value)
        if mlp_chunk_size is not None:
            _check_positive_int("mlp_chunk_size", mlp_chunk_size)
        if attention_chunk_size is not None:
            _check_positive_int("attention_chunk_size", attention_chunk_size)
        if prompt_chunk_size is not None:
            _check_positive_int("prompt_chunk_size", prompt_chunk_size)
        if head_dim is None:
            if hidden_size % num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                    f"({num_attention_heads}), "
                    "or head_dim must be given"
                )
            head_dim = hidden_size // num_attention_heads
        _check_positive_int("head_dim", head_dim)
        _check_choice("token_mixer", token_mixer, TOKEN_MIXERS)
        _check_choice("channel_mixer", channel_mixer, CHANNEL_MIXERS)
        _check_choice("norm_type", norm_type, NORM_TYPES)
        _check_choice("feature_map", feature_map, FEATURE_MAPS)
        _check_choice("output_gate_act", output_gate_act, OUTPUT_GATE_ACTS)
        if layer_types is None:
            layer_types = ["linear_attention"] * num_hidden_layers
        layer_types = list(layer_types)
        if len(layer_types) != num_hidden_layers:
            raise ValueError(
                f"layer_types must have one entry per layer (num_hidden_layers = {num_hidden_layers}), "
                f"got {len(layer_types)}: {layer_types}"
            )
        for layer_type in layer_types:
            _check_choice("layer_types entry", layer_type, LAYER_TYPES)
        if "full_attention" in layer_types and head_dim % 2:
            raise ValueError(
                f"full_attention layers use rotary embeddings and need an even head_dim, got {head_dim}"
            )
        if value_head_dim is None:
            value_head_dim = head_dim
        _check_positive_int("value_head_dim", value_head_dim)
        if qk_activation is not None:
            _check_choice("qk_activation", qk_activation, QK_ACTIVATIONS)
        _check_choice("position_encoding", position_encoding, POSITION_ENCODINGS)
        if token_mixer == "gla" and position_encoding == "lrpe":
            raise ValueError(
                "token_mixer='gla' decays each of the head_dim key channels, but position_encoding='lrpe' doubles "
                "the key width: use position_encoding 'none' or 'rope' with 'gla'"
            )
        if position_encoding == "rope" and head_dim % 2:
            raise ValueError(f"position_encoding='rope' needs an even head_dim, got {head_dim}")
        if position_encoding_layers is not None:
            position_encoding_layers = [int(i) for i in position_encoding_layers]
            bad = [i for i in position_encoding_layers if not 0 <= i < num_hidden_layers]
            if bad:
                raise ValueError(
                    f"position_encoding_layers must be layer indices in [0, {num_hidden_layers}), got {bad}"
                )
        if decay_schedule is not None:
            _check_choice("decay_schedule", decay_schedule, DECAY_SCHEDULES)
            if token_mixer != "lightning":
                raise ValueError(
                    f"decay_schedule applies to the 'lightning' token mixer, got token_mixer={token_mixer!r}"
                )
        _check_choice("output_norm", output_norm, OUTPUT_NORMS)
        for name, value in (("attention_scale", attention_scale), ("embedding_scale", embedding_scale)):
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            if value is not None and (not number or value <= 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        _check_positive_int("max_position_embeddings", max_position_embeddings)
        for name, value in (
            ("rms_norm_eps", rms_norm_eps),
            ("gate_logit_normalizer", gate_logit_normalizer),
            ("rope_theta", rope_theta),
            ("initializer_range", initializer_range),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.token_mixer = token_mixer
        self.layer_types = layer_types
        self.channel_mixer = channel_mixer
        self.norm_type = norm_type
        self.rms_norm_eps = rms_norm_eps
        self.feature_map = feature_map
        self.output_gate_act = output_gate_act
        self.gate_low_rank_dim = gate_low_rank_dim
        self.gate_logit_normalizer = gate_logit_normalizer
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.loss_chunk_size = loss_chunk_size
        self.mlp_chunk_size = mlp_chunk_size
        self.attention_chunk_size = attention_chunk_size
        self.value_head_dim = value_head_dim
        self.qk_activation = qk_activation
        self.position_encoding = position_encoding
        self.position_encoding_layers = position_encoding_layers
        self.decay_schedule = decay_schedule
        self.attention_scale = attention_scale
        self.output_norm = output_norm
        self.embedding_scale = embedding_scale
        self.use_cache = use_cache
        self.prompt_chunk_size = prompt_chunk_size
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


__all__ = ["LaspConfig"]
