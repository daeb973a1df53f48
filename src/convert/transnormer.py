"""The TransNormerLLM layout (OpenNLPLab's Hub remote code, model_type "transnormer": TransNormerLLM-385M / 1B /
7B and TransNormerLLM2-1B / 3B).

The source model, as its code computes it (per layer l of L, heads h of H, head dim D = hidden_dim / H):

    x = embed_scale * E[ids]                     embed_scale = sqrt(decoder_embed_dim) unless no_scale_embedding
    block: x += out_proj(u * srms(lin_attn(srms(x))));  x += l3(l1(srms(x)) * l2(srms(x)))
    q, k, v, u = qkvu_proj(x).chunk(4);  q, k = act(q), act(k)     act = linear_act_fun (silu / none)
    LRPE on the layers of linear_use_lrpe_list: q, k -> [x cos(theta n), x sin(theta n)], theta [H, 1, D] learned
    o_n = sum_{m <= n} (q_n . k_m) exp(-s_h (1 - l / (L - 1) + 1e-5) (n - m)) v_m     (scale 1)
    s_h: ALiBi slopes (interleaved for head counts that are not a power of two)
    logits = srms(x) W_head^T, W_head tied to E unless the config says tie_word_embeddings = false

srms is the weightless RMS norm (eps 1e-6). The mapping onto `LaspConfig`: token_mixer "lightning",
decay_schedule "lightning_alibi", position_encoding "lrpe" on the listed layers, qk_activation from
linear_act_fun, output_gate_act "identity", channel_mixer "sglu", norm_type "srmsnorm", embedding_scale.

TransNormerLLM2's checkpoints use the same layout and model code (model_type "transnormer", the same tensor
names); what differs is configuration (20 heads for the 3B, a different vocabulary), which the config carries.
"""

from __future__ import annotations

import math
import re

import torch

MODEL_TYPES = ("transnormer",)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "none": "identity", "identity": "identity", None: "identity"}
# Config keys of variants of this code that the lasp model does not express (MoE, hybrid softmax layers).
_UNSUPPORTED_KEYS = ("num_experts", "decoder_attention_types", "moe")


def build_config(source: dict):
    from lasp_hf.modeling import LaspConfig

    for key in _UNSUPPORTED_KEYS:
        if key in source:
            raise ValueError(f"transnormer config key {key!r} is set: a model variant lasp-hf does not convert")
    if source.get("norm_type", "simplermsnorm") != "simplermsnorm":
        raise ValueError(f"transnormer norm_type must be 'simplermsnorm', got {source['norm_type']!r}")
    if source.get("bias", False):
        raise ValueError("transnormer checkpoints with bias=True are not supported (lasp layers have no biases)")
    act = source.get("linear_act_fun", "silu")
    if act not in _ACTIVATIONS:
        choices = sorted(map(str, _ACTIVATIONS))
        raise ValueError(f"transnormer linear_act_fun must be one of {choices}, got {act!r}")
    hidden = source.get("decoder_embed_dim", 1024)
    layers = source.get("decoder_layers", 24)
    heads = source.get("decoder_attention_heads", 8)
    attention_width = source.get("hidden_dim", hidden)
    if attention_width % heads:
        raise ValueError(f"transnormer hidden_dim {attention_width} is not divisible by {heads} heads")
    lrpe_list = list(source.get("linear_use_lrpe_list") or [])
    if lrpe_list and len(lrpe_list) != layers:
        raise ValueError(f"linear_use_lrpe_list has {len(lrpe_list)} entries for {layers} decoder_layers")
    if not lrpe_list:
        lrpe_list = [bool(source.get("linear_use_lrpe", False))] * layers
    lrpe_layers = [i for i, used in enumerate(lrpe_list) if used]
    if lrpe_layers and attention_width != hidden:
        # The source sizes LRPE's theta by decoder_embed_dim / H but applies it to hidden_dim / H wide heads.
        raise ValueError(f"LRPE needs hidden_dim == decoder_embed_dim, got {attention_width} and {hidden}")
    glu_dim = source.get("glu_dim", 2816)
    return LaspConfig(
        vocab_size=source.get("vocab_size", 64000),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        head_dim=attention_width // heads,
        intermediate_size=hidden if glu_dim == -1 else glu_dim,
        token_mixer="lightning",
        channel_mixer="sglu",
        norm_type="srmsnorm",
        rms_norm_eps=1e-6,
        output_gate_act="identity",
        qk_activation=_ACTIVATIONS[act],
        decay_schedule="lightning_alibi",
        position_encoding="lrpe" if lrpe_layers else "none",
        position_encoding_layers=lrpe_layers or None,
        embedding_scale=1.0 if source.get("no_scale_embedding", False) else math.sqrt(hidden),
        # transformers 4.x tied the head to the embedding unless the config said otherwise.
        tie_word_embeddings=source.get("tie_word_embeddings", True),
        initializer_range=source.get("init_std", 0.02),
        pad_token_id=source.get("pad_token_id", 0),
        bos_token_id=source.get("bos_token_id", 1),
        eos_token_id=source.get("eos_token_id", 2),
        use_cache=source.get("use_cache", True),
    )


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "token_mixer.out_proj.weight": "token_mixer.o_proj.weight",
    "channel_mixer.l1.weight": "channel_mixer.gate_proj.weight",
    "channel_mixer.l2.weight": "channel_mixer.up_proj.weight",
    "channel_mixer.l3.weight": "channel_mixer.down_proj.weight",
}


def map_tensor(name: str, tensor: torch.Tensor, config) -> list[tuple[str, torch.Tensor]]:
    if name == "model.embed_tokens.weight":
        return [(name, tensor)]
    if name == "lm_head.weight":
        # A tied head is the embedding (transformers ties them on load whatever the shard holds).
        return [] if config.tie_word_embeddings else [(name, tensor)]
    if name == "decoder.version":
        return []  # fairseq bookkeeping the source's own loader ignores
    match = _LAYER.fullmatch(name)
    if match is None:
        return [(name, tensor)]  # unknown: the caller reports it as unexpected
    prefix, rest = f"model.layers.{match[1]}.", match[2]
    if rest == "token_mixer.qkvu_proj.weight":
        if tensor.shape[0] % 4:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}: its rows do not split into q, k, v, u")
        q, k, v, u = tensor.chunk(4, dim=0)
        parts = zip("qkvu", (q, k, v, u), strict=True)
        return [(prefix + f"token_mixer.{p}_proj.weight", w) for p, w in parts]
    if rest == "token_mixer.lrpe.theta":
        # [H, 1, D] in the source, [H, D] here.
        return [(prefix + "token_mixer.position.theta", tensor.reshape(tensor.shape[0], -1))]
    return [(prefix + _LAYER_NAMES.get(rest, rest), tensor)]
