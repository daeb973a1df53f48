"""The flash-linear-attention RetNet layout (`fla-hub/retnet-*`, model_type "retnet", fla's
`fla/models/retnet` and `fla/layers/multiscale_retention.py`).

The source model (per layer, heads h of H, key head dim D = hidden * expand_k / H, value head dim
V = hidden * expand_v / H):

    x = E[ids];  block: x += o_proj(rmsnorm_V(o) * swish(g_proj(rmsnorm(x))));  x += mlp(rmsnorm(x))
    q, k, v = q_proj, k_proj, v_proj (no feature map);  q, k = rope(q), rope(k)  (rotate-half, base 10000,
    positions from the cache's length in decoding)
    o = retention(q, k, v): S_t = gamma_h S_{t-1} + k_t^T v_t, o_t = D^-0.5 q_t S_t, gamma_h = 1 - 2^(-5 - h)
    rmsnorm_V: RMSNorm over each head's V channels with one learned weight [V] (fused with the swish gate)
    mlp(x) = down_proj(swish(gate_proj(x)) * up_proj(x));  the block norms and the final norm have weights
    logits = rmsnorm(x) lm_head^T

The mapping onto `LaspConfig`: token_mixer "lightning" with decay_schedule "retnet", qk_activation "identity",
position_encoding "rope", attention_scale D^-0.5, value_head_dim V, output_norm "per_head", output_gate_act
"silu", channel_mixer "swiglu", norm_type "rmsnorm".
"""

from __future__ import annotations

import re

import torch

MODEL_TYPES = ("retnet",)
_SWISH = ("swish", "silu")


def fla_intermediate_size(source: dict, hidden: int, default_ratio: int = 2) -> int:
    """fla's GatedMLP: intermediate_size, or hidden * hidden_ratio * 2 / 3 rounded up to a multiple of 256
    (`default_ratio`: the model config's default hidden_ratio, RetNet's 2 or GLA's 4)."""
    if source.get("intermediate_size") is not None:
        return source["intermediate_size"]
    ratio = source.get("hidden_ratio", default_ratio)  # GatedMLP's own default (4) when None
    size = int(hidden * (4 if ratio is None else ratio) * 2 / 3)
    return 256 * ((size + 255) // 256)


def build_config(source: dict):
    from lasp_hf.modeling import LaspConfig

    hidden = source.get("hidden_size", 2048)
    heads = source.get("num_heads", 8)
    checks = (
        (source.get("num_kv_heads") in (None, heads), f"num_kv_heads = {source.get('num_kv_heads')}"),
        (not source.get("use_short_conv", False), "use_short_conv = true"),
        (source.get("attn") is None, "attn (softmax attention layers) set"),
        (source.get("use_output_gate", True), "use_output_gate = false"),
        (source.get("feature_map") is None, f"feature_map = {source.get('feature_map')!r}"),
        (source.get("elementwise_affine", True) is not False, "elementwise_affine = false"),
        (source.get("hidden_act", "swish") in _SWISH, f"hidden_act = {source.get('hidden_act')!r}"),
    )
    for ok, what in checks:
        if not ok:
            raise ValueError(f"fla RetNet checkpoints with {what} are not supported")
    key_width = hidden * source.get("expand_k", 1.0)
    value_width = hidden * source.get("expand_v", 2.0)
    for name, width in (("expand_k", key_width), ("expand_v", value_width)):
        if width != int(width) or int(width) % heads:
            raise ValueError(f"hidden_size * {name} = {width} must be an integer divisible by {heads} heads")
    head_dim = int(key_width) // heads
    return LaspConfig(
        vocab_size=source.get("vocab_size", 32000),
        hidden_size=hidden,
        num_hidden_layers=source.get("num_hidden_layers", 24),
        num_attention_heads=heads,
        head_dim=head_dim,
        value_head_dim=int(value_width) // heads,
        intermediate_size=fla_intermediate_size(source, hidden),
        token_mixer="lightning",
        channel_mixer="swiglu",
        norm_type="rmsnorm",
        rms_norm_eps=source.get("norm_eps", 1e-6),
        output_gate_act="silu",
        qk_activation="identity",
        position_encoding="rope",
        rope_theta=10000.0,
        decay_schedule="retnet",
        attention_scale=head_dim**-0.5,
        output_norm="per_head",
        max_position_embeddings=source.get("max_position_embeddings", 2048),
        tie_word_embeddings=source.get("tie_word_embeddings", False),
        initializer_range=source.get("initializer_range", 0.02),
        pad_token_id=source.get("pad_token_id"),
        bos_token_id=source.get("bos_token_id", 1),
        eos_token_id=source.get("eos_token_id", 2),
        use_cache=source.get("use_cache", True),
    )


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# flash-linear-attention's layer names shared by its RetNet and GLA models -> lasp's.
FLA_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "token_mixer.q_proj.weight",
    "attn.k_proj.weight": "token_mixer.k_proj.weight",
    "attn.v_proj.weight": "token_mixer.v_proj.weight",
    "attn.g_proj.weight": "token_mixer.u_proj.weight",
    "attn.o_proj.weight": "token_mixer.o_proj.weight",
    # The per-head output norm: fused with the gate (fuse_norm = true) or not.
    "attn.g_norm_swish_gate.weight": "token_mixer.o_norm.weight",
    "attn.g_norm.weight": "token_mixer.o_norm.weight",
    "mlp.gate_proj.weight": "channel_mixer.gate_proj.weight",
    "mlp.up_proj.weight": "channel_mixer.up_proj.weight",
    "mlp.down_proj.weight": "channel_mixer.down_proj.weight",
}
_TOP_NAMES = {
    "model.embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
}


def map_fla_tensor(name: str, tensor: torch.Tensor, config, layer_names: dict) -> list[tuple[str, torch.Tensor]]:
    """An fla checkpoint tensor under its lasp name (`layer_names` maps the names inside a layer); a name it does
    not know is returned as it is, for the caller to report as unexpected."""
    if name in _TOP_NAMES:
        return [(_TOP_NAMES[name], tensor)]
    if name == "lm_head.weight":
        return [] if config.tie_word_embeddings else [(name, tensor)]
    match = _LAYER.fullmatch(name)
    if match is None or match[2] not in layer_names:
        return [(name, tensor)]
    return [(f"model.layers.{match[1]}.{layer_names[match[2]]}", tensor)]


def map_tensor(name: str, tensor: torch.Tensor, config) -> list[tuple[str, torch.Tensor]]:
    return map_fla_tensor(name, tensor, config, FLA_LAYER_NAMES)
