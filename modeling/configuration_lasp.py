"""Configuration of the lasp model family (model_type "lasp"): linear-attention causal LMs with an
optional share of softmax-attention layers (hybrids)."""

from transformers import PretrainedConfig

TOKEN_MIXERS = ("lightning", "linear", "gated")
LAYER_TYPES = ("linear_attention", "full_attention")
CHANNEL_MIXERS = ("sglu", "swiglu")
NORM_TYPES = ("rmsnorm", "srmsnorm")
FEATURE_MAPS = ("elu", "identity")
OUTPUT_GATE_ACTS = ("sigmoid", "silu", "identity")


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
            1), `"linear"` (the LASP paper's basic linear attention: feature map, no decay) or `"gated"` (a
            decay per token and head from a learned low-rank projection, as in gated linear attention).
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
            Activation of the output gate of the `"lightning"` and `"gated"` token mixers: `"sigmoid"`,
            `"silu"` or `"identity"` (TransNormerLLM's released models multiply by the raw projection u).
        gate_low_rank_dim (`int`, *optional*, defaults to 16):
            Rank of the decay projection of the `"gated"` token mixer.
        gate_logit_normalizer (`float`, *optional*, defaults to 16.0):
            The `"gated"` log decay is `logsigmoid(W2 W1 x + b) / gate_logit_normalizer` (as in GLA).
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the rotary embeddings of the `"full_attention"` layers.
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
