"""The flash-linear-attention GLA layout (`fla-hub/gla-*`, model_type "gla", fla's `fla/models/gla` and
`fla/layers/gla.py`).

The source model (per layer, heads h of H, key head dim K = hidden * expand_k / H, value head dim
V = hidden * expand_v / H; fla's defaults expand_k 0.5, expand_v 1):

    x = E[ids];  block: x += o_proj(rmsnorm_V(o) * swish(g_proj(h)));  x += mlp(rmsnorm(x)),  h = rmsnorm(x)
    q, k, v = q_proj(h), k_proj(h), v_proj(h) (no feature map, no position encoding)
    gk = logsigmoid(gk_proj.1(gk_proj.0(h))) / 16    [B, T, H, K]  (rank 16, normalizer 16: fla's layer defaults,
                                                                   which its GLA model does not override)
    o = gla(q, k, v, gk): S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t, o_t = K^-0.5 q_t S_t
    rmsnorm_V: RMSNorm over each head's V channels with one learned weight [V] (fused with the swish gate)
    mlp(x) = down_proj(swish(gate_proj(x)) * up_proj(x));  the block norms and the final norm have weights
    logits = rmsnorm(x) lm_head^T

The mapping onto `LaspConfig`: token_mixer "gla", head_dim K, value_head_dim V, gate_low_rank_dim 16,
gate_logit_normalizer 16, output_norm "per_head", output_gate_act "silu", channel_mixer "swiglu", norm_type
"rmsnorm" (the scale K^-0.5 and the identity q / k activation are the "gla" token mixer's defaults).
"""

from __future__ import annotations

import torch

from .fla_retnet import FLA_LAYER_NAMES, fla_intermediate_size, map_fla_tensor

MODEL_TYPES = ("gla",)
_SWISH = ("swish", "silu")
# fla's GatedLinearAttention defaults; its GLA model builds every layer with them, whatever config.json says.
GATE_LOW_RANK_DIM = 16
GATE_LOGIT_NORMALIZER = 16


def _refuse_unsupported(source: dict) -> None:
    heads = source.get("num_heads", 4)
    checks = (
        (source.get("num_kv_heads") in (None, heads), f"num_kv_heads = {source.get('num_kv_heads')} (grouped)"),
        (not source.get("use_short_conv", False), "use_short_conv = true"),
        (source.get("attn") is None, "attn (softmax attention layers) set"),
        (source.get("use_output_gate", True), "use_output_gate = false"),
        (source.get("feature_map") is None, f"feature_map = {source.get('feature_map')!r}"),
        (source.get("clamp_min") is None, f"clamp_min = {source.get('clamp_min')!r}"),
        (source.get("elementwise_affine", True) is not False, "elementwise_affine = false"),
        (source.get("hidden_act", "swish") in _SWISH, f"hidden_act = {source.get('hidden_act')!r}"),
        (source.get("use_gk", True), "use_gk = false"),
        (not source.get("use_gv", False), "use_gv = true"),
        (source.get("attnres_block_size") is None, f"attnres_block_size = {source.get('attnres_block_size')!r}"),
    )
    for ok, what in checks:
        if not ok:
            raise ValueError(f"fla GLA checkpoints with {what} are not supported")
    for key, value in (("gate_low_rank_dim", GATE_LOW_RANK_DIM), ("gate_logit_normalizer", GATE_LOGIT_NORMALIZER)):
        if source.get(key, value) != value:
            raise ValueError(
                f"fla GLA config sets {key} = {source[key]!r}, but fla's GLA model builds its layers with {value} "
                "whatever config.json says: the checkpoint's own value is ambiguous, so it is not converted"
            )


def build_config(source: dict):
    from lasp_hf.modeling import LaspConfig

    _refuse_unsupported(source)
    hidden = source.get("hidden_size", 2048)
    heads = source.get("num_heads", 4)
    key_width = hidden * source.get("expand_k", 0.5)
    value_width = hidden * source.get("expand_v", 1.0)
    for name, width in (("expand_k", key_width), ("expand_v", value_width)):
        if width != int(width) or int(width) % heads:
            raise ValueError(f"hidden_size * {name} = {width} must be an integer divisible by {heads} heads")
    return LaspConfig(
        vocab_size=source.get("vocab_size", 32000),
        hidden_size=hidden,
        num_hidden_layers=source.get("num_hidden_layers", 24),
        num_attention_heads=heads,
        head_dim=int(key_width) // heads,
        value_head_dim=int(value_width) // heads,
        intermediate_size=fla_intermediate_size(source, hidden, default_ratio=4),
        token_mixer="gla",
        channel_mixer="swiglu",
        norm_type="rmsnorm",
        rms_norm_eps=source.get("norm_eps", 1e-6),
        output_gate_act="silu",
        output_norm="per_head",
        gate_low_rank_dim=GATE_LOW_RANK_DIM,
        gate_logit_normalizer=float(GATE_LOGIT_NORMALIZER),
        max_position_embeddings=source.get("max_position_embeddings", 2048),
        tie_word_embeddings=source.get("tie_word_embeddings", False),
        initializer_range=source.get("initializer_range", 0.02),
        pad_token_id=source.get("pad_token_id"),
        bos_token_id=source.get("bos_token_id", 1),
        eos_token_id=source.get("eos_token_id", 2),
        use_cache=source.get("use_cache", True),
    )


_LAYER_NAMES = {
    **FLA_LAYER_NAMES,
    "attn.gk_proj.0.weight": "token_mixer.decay_proj.0.weight",
    "attn.gk_proj.1.weight": "token_mixer.decay_proj.1.weight",
    "attn.gk_proj.1.bias": "token_mixer.decay_proj.1.bias",
}


def map_tensor(name: str, tensor: torch.Tensor, config) -> list[tuple[str, torch.Tensor]]:
    return map_fla_tensor(name, tensor, config, _LAYER_NAMES)
