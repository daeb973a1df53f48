"""Tiny source checkpoints for the converter tests, written by the tests themselves (random tensors under the
source's key names and shapes, with the source's config.json keys), and a float64 statement of each source
model's forward, written from the source's math (not from lasp-hf's code): the oracle the converted model is
checked against.

No tests here: test_convert_*.py import it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER = REPO_ROOT / "data" / "tokenizer"
VOCAB = 64


def write_weights(folder: Path, tensors: dict, fmt: str, num_shards: int = 1) -> None:
    """tensors under folder as safetensors or .bin, in `num_shards` files with an index when more than one."""
    names = list(tensors)
    groups = [names[i::num_shards] for i in range(num_shards)]
    if fmt == "safetensors":
        single, pattern, index_name = "model.safetensors", "model-{:05d}-of-{:05d}.safetensors", "model.safetensors"
    else:
        single, pattern, index_name = "pytorch_model.bin", "pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin"
    weight_map = {}
    for i, group in enumerate(groups):
        file = single if num_shards == 1 else pattern.format(i + 1, num_shards)
        part = {n: tensors[n].contiguous() for n in group}
        if fmt == "safetensors":
            save_file(part, str(folder / file))
        else:
            torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(group, file))
    if num_shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{index_name}.index.json").write_text(json.dumps(index))


def _randn(gen, *shape, std=0.3):
    return torch.randn(*shape, generator=gen, dtype=torch.float32) * std


# ----------------------------------------------------------------------------------------------- TransNormerLLM


def tnl_source(folder: Path, *, heads=5, head_dim=8, layers=3, glu=48, lrpe_list=(1, 0, 1), tied=True,
               no_scale_embedding=False, act="silu", fmt="safetensors", num_shards=2, seed=0, extra=None,
               vocab=VOCAB):
    """A tiny TransNormerLLM checkpoint (the Hub code's config keys and tensor names); returns (config, tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    hidden = heads * head_dim
    config = {
        "model_type": "transnormer", "architectures": ["TransnormerForCausalLM"], "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, "vocab_size": vocab, "use_cache": True, "init_std": 0.02,
        "decoder_embed_dim": hidden, "decoder_layers": layers, "decoder_attention_heads": heads,
        "no_scale_embedding": no_scale_embedding, "add_bos_token": False, "norm_type": "simplermsnorm",
        "linear_use_lrpe_list": list(lrpe_list), "hidden_dim": hidden, "linear_act_fun": act, "glu_dim": glu,
        "bias": False, "torch_dtype": "float32", "transformers_version": "4.31.0",
    }
    if not tied:
        config["tie_word_embeddings"] = False
    gen = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": _randn(gen, vocab, hidden, std=0.05)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "token_mixer.qkvu_proj.weight"] = _randn(gen, 4 * hidden, hidden)
        tensors[p + "token_mixer.out_proj.weight"] = _randn(gen, hidden, hidden)
        if lrpe_list and lrpe_list[i]:
            d = heads * head_dim  # the source's initial theta, perturbed so that a learned theta is what loads
            theta = 10000 ** (-2 / d * torch.arange(d, dtype=torch.float32))
            tensors[p + "token_mixer.lrpe.theta"] = (theta * (1 + 0.1 * torch.rand(d, generator=gen))).view(
                heads, 1, head_dim
            )
        tensors[p + "channel_mixer.l1.weight"] = _randn(gen, glu, hidden)
        tensors[p + "channel_mixer.l2.weight"] = _randn(gen, glu, hidden)
        tensors[p + "channel_mixer.l3.weight"] = _randn(gen, hidden, glu)
    if not tied:
        tensors["lm_head.weight"] = _randn(gen, vocab, hidden)
    tensors.update(extra or {})
    (folder / "config.json").write_text(json.dumps(config))
    write_weights(folder, tensors, fmt, num_shards)
    return config, tensors


def alibi_slopes64(heads: int) -> list[float]:
    """ALiBi (Press et al.): for H a power of two, 2^(-8 i / H), i = 1..H; otherwise the slopes of the largest
    power of two P < H followed by the odd-indexed (1st, 3rd, ...) slopes of 2P."""
    p = 2 ** int(math.floor(math.log2(heads)))
    base = [2.0 ** (-8.0 * i / p) for i in range(1, p + 1)]
    if p == heads:
        return base
    extra = [2.0 ** (-8.0 * i / (2 * p)) for i in range(1, 2 * p + 1, 2)]
    return base + extra[: heads - p]


def _srms(x, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def tnl_forward64(config: dict, tensors: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab] of TransNormerLLM's forward in float64, from the Hub code's math (quadratic form)."""
    W = {k: v.double() for k, v in tensors.items()}
    hidden, heads, layers = config["decoder_embed_dim"], config["decoder_attention_heads"], config["decoder_layers"]
    D = config["hidden_dim"] // heads
    scale = 1.0 if config["no_scale_embedding"] else math.sqrt(hidden)
    act = torch.nn.functional.silu if config["linear_act_fun"] == "silu" else (lambda t: t)
    lrpe = config["linear_use_lrpe_list"]
    x = W["model.embed_tokens.weight"][ids] * scale
    B, T = ids.shape
    n = torch.arange(T, dtype=torch.float64)
    dist = n[:, None] - n[None, :]
    slopes = torch.tensor(alibi_slopes64(heads), dtype=torch.float64)
    for i in range(layers):
        p = f"model.layers.{i}."
        h = _srms(x)
        q, k, v, u = (h @ W[p + "token_mixer.qkvu_proj.weight"].T).chunk(4, dim=-1)
        q, k, v = (t.view(B, T, heads, D).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        q, k = act(q), act(k)
        if lrpe and lrpe[i]:
            theta = W[p + "token_mixer.lrpe.theta"]  # [H, 1, D]
            angle = theta * n[:, None]  # [H, T, D]
            q = torch.cat([q * angle.cos(), q * angle.sin()], dim=-1)
            k = torch.cat([k * angle.cos(), k * angle.sin()], dim=-1)
        rate = slopes * (1 - i / (layers - 1) + 1e-5)
        decay = torch.exp(-rate[:, None, None] * dist).masked_fill(dist < 0, 0.0)  # [H, T, T]
        o = ((q @ k.transpose(-1, -2)) * decay) @ v
        o = o.transpose(1, 2).reshape(B, T, -1)
        x = x + (u * _srms(o)) @ W[p + "token_mixer.out_proj.weight"].T
        h = _srms(x)
        glu = (h @ W[p + "channel_mixer.l1.weight"].T) * (h @ W[p + "channel_mixer.l2.weight"].T)
        x = x + glu @ W[p + "channel_mixer.l3.weight"].T
    head = W["model.embed_tokens.weight"] if config.get("tie_word_embeddings", True) else W["lm_head.weight"]
    return _srms(x) @ head.T


# ----------------------------------------------------------------------------------------------- fla RetNet


def retnet_source(folder: Path, *, hidden=32, heads=2, layers=2, expand_k=1, expand_v=2, intermediate_size=48,
                  hidden_ratio=None, fuse_norm=True, tied=False, fmt="safetensors", num_shards=1, seed=0,
                  extra=None):
    """A tiny fla RetNet checkpoint (fla's RetNetConfig keys and tensor names); returns (config, tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "retnet", "architectures": ["RetNetForCausalLM"], "attn_mode": "chunk",
        "hidden_size": hidden, "expand_k": expand_k, "expand_v": expand_v, "hidden_ratio": hidden_ratio,
        "intermediate_size": intermediate_size, "num_hidden_layers": layers, "num_heads": heads,
        "num_kv_heads": None, "feature_map": None, "hidden_act": "swish", "use_short_conv": False,
        "conv_size": 4, "use_output_gate": True, "max_position_embeddings": 2048, "elementwise_affine": True,
        "norm_eps": 1e-6, "attn": None, "use_cache": True, "pad_token_id": None, "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": tied, "initializer_range": 0.02, "fuse_norm": fuse_norm,
        "fuse_swiglu": True, "fuse_cross_entropy": True, "vocab_size": VOCAB, "torch_dtype": "float32",
    }
    if intermediate_size is None:
        inter = int(hidden * hidden_ratio * 2 / 3)
        inter = 256 * ((inter + 255) // 256)
    else:
        inter = intermediate_size
    kw, vw = hidden * expand_k, hidden * expand_v
    gen = torch.Generator().manual_seed(seed)
    tensors = {"model.embeddings.weight": _randn(gen, VOCAB, hidden, std=1.0)}
    norm_name = "g_norm_swish_gate" if fuse_norm else "g_norm"
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "attn_norm.weight"] = 1 + _randn(gen, hidden, std=0.1)
        tensors[p + "attn.q_proj.weight"] = _randn(gen, kw, hidden)
        tensors[p + "attn.k_proj.weight"] = _randn(gen, kw, hidden)
        tensors[p + "attn.v_proj.weight"] = _randn(gen, vw, hidden)
        tensors[p + "attn.g_proj.weight"] = _randn(gen, vw, hidden)
        tensors[p + "attn.o_proj.weight"] = _randn(gen, hidden, vw)
        tensors[p + f"attn.{norm_name}.weight"] = 1 + _randn(gen, vw // heads, std=0.1)
        tensors[p + "mlp_norm.weight"] = 1 + _randn(gen, hidden, std=0.1)
        tensors[p + "mlp.gate_proj.weight"] = _randn(gen, inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = _randn(gen, inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = _randn(gen, hidden, inter)
    tensors["model.norm.weight"] = 1 + _randn(gen, hidden, std=0.1)
    if not tied:
        tensors["lm_head.weight"] = _randn(gen, VOCAB, hidden)
    tensors.update(extra or {})
    (folder / "config.json").write_text(json.dumps(config))
    write_weights(folder, tensors, fmt, num_shards)
    return config, tensors


def retnet_forward64(config: dict, tensors: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab] of fla's RetNet forward in float64 (retention in its parallel form)."""
    W = {k: v.double() for k, v in tensors.items()}
    hidden, heads, layers = config["hidden_size"], config["num_heads"], config["num_hidden_layers"]
    D, Vd = int(hidden * config["expand_k"]) // heads, int(hidden * config["expand_v"]) // heads
    eps = config["norm_eps"]
    silu = torch.nn.functional.silu

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x, n):  # x [B, H, T, D], rotate-half
        freqs = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        angle = n[:, None] * freqs  # [T, D/2]
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)

    B, T = ids.shape
    n = torch.arange(T, dtype=torch.float64)
    dist = n[:, None] - n[None, :]
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64))
    decay = (gamma[:, None, None] ** dist.clamp(min=0)).masked_fill(dist < 0, 0.0)  # [H, T, T]
    x = W["model.embeddings.weight"][ids]
    norm_name = "g_norm_swish_gate" if config.get("fuse_norm", True) else "g_norm"
    for i in range(layers):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = (h @ W[p + "attn.q_proj.weight"].T).view(B, T, heads, D).transpose(1, 2)
        k = (h @ W[p + "attn.k_proj.weight"].T).view(B, T, heads, D).transpose(1, 2)
        v = (h @ W[p + "attn.v_proj.weight"].T).view(B, T, heads, Vd).transpose(1, 2)
        q, k = rope(q, n), rope(k, n)
        o = ((q @ k.transpose(-1, -2)) * D**-0.5 * decay) @ v  # [B, H, T, V]
        o = rms(o.transpose(1, 2), W[p + f"attn.{norm_name}.weight"]).reshape(B, T, -1)
        o = o * silu(h @ W[p + "attn.g_proj.weight"].T)
        x = x + o @ W[p + "attn.o_proj.weight"].T
        h = rms(x, W[p + "mlp_norm.weight"])
        mlp = silu(h @ W[p + "mlp.gate_proj.weight"].T) * (h @ W[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ W[p + "mlp.down_proj.weight"].T
    head = W["model.embeddings.weight"] if config["tie_word_embeddings"] else W["lm_head.weight"]
    return rms(x, W["model.norm.weight"]) @ head.T


# ----------------------------------------------------------------------------------------------- fla GLA


def gla_source(folder: Path, *, hidden=32, heads=2, layers=2, expand_k=0.5, expand_v=1, intermediate_size=48,
               hidden_ratio=None, fuse_norm=True, tied=False, fmt="safetensors", num_shards=1, seed=0, extra=None,
               config_extra=None):
    """A tiny fla GLA checkpoint (fla's GLAConfig keys and tensor names); returns (config, tensors). The gate's
    bias spreads the decays from ~1 (slow) to ~exp(-1.3) (fast) per step, so the per-channel decay matters."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "gla", "architectures": ["GLAForCausalLM"], "attn_mode": "chunk", "hidden_size": hidden,
        "expand_k": expand_k, "expand_v": expand_v, "hidden_ratio": hidden_ratio,
        "intermediate_size": intermediate_size, "num_hidden_layers": layers, "num_heads": heads,
        "num_kv_heads": None, "feature_map": None, "use_short_conv": False, "conv_size": 4,
        "use_output_gate": True, "clamp_min": None, "hidden_act": "swish", "max_position_embeddings": 2048,
        "elementwise_affine": True, "norm_eps": 1e-6, "use_gk": True, "use_gv": False, "attn": None,
        "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": tied,
        "initializer_range": 0.02, "fuse_norm": fuse_norm, "fuse_swiglu": True, "fuse_cross_entropy": True,
        "vocab_size": VOCAB, "torch_dtype": "float32",
    }
    config.update(config_extra or {})
    if intermediate_size is None:
        inter = int(hidden * (hidden_ratio or 4) * 2 / 3)
        inter = 256 * ((inter + 255) // 256)
    else:
        inter = intermediate_size
    kw, vw = int(hidden * expand_k), int(hidden * expand_v)
    gen = torch.Generator().manual_seed(seed)
    tensors = {"model.embeddings.weight": _randn(gen, VOCAB, hidden, std=1.0)}
    norm_name = "g_norm_swish_gate" if fuse_norm else "g_norm"
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "attn_norm.weight"] = 1 + _randn(gen, hidden, std=0.1)
        tensors[p + "attn.q_proj.weight"] = _randn(gen, kw, hidden)
        tensors[p + "attn.k_proj.weight"] = _randn(gen, kw, hidden)
        tensors[p + "attn.v_proj.weight"] = _randn(gen, vw, hidden)
        tensors[p + "attn.g_proj.weight"] = _randn(gen, vw, hidden)
        tensors[p + "attn.gk_proj.0.weight"] = _randn(gen, 16, hidden)
        tensors[p + "attn.gk_proj.1.weight"] = _randn(gen, kw, 16)
        tensors[p + "attn.gk_proj.1.bias"] = _randn(gen, kw, std=8.0)
        tensors[p + "attn.o_proj.weight"] = _randn(gen, hidden, vw)
        tensors[p + f"attn.{norm_name}.weight"] = 1 + _randn(gen, vw // heads, std=0.1)
        tensors[p + "mlp_norm.weight"] = 1 + _randn(gen, hidden, std=0.1)
        tensors[p + "mlp.gate_proj.weight"] = _randn(gen, inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = _randn(gen, inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = _randn(gen, hidden, inter)
    tensors["model.norm.weight"] = 1 + _randn(gen, hidden, std=0.1)
    if not tied:
        tensors["lm_head.weight"] = _randn(gen, VOCAB, hidden)
    tensors.update(extra or {})
    (folder / "config.json").write_text(json.dumps(config))
    write_weights(folder, tensors, fmt, num_shards)
    return config, tensors


def gla_forward64(config: dict, tensors: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab] of fla's GLA forward in float64, the gated recurrence token by token (GLA paper eq.
    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = K^-0.5 q_t S_t, alpha_t = exp(logsigmoid(gk_proj(h)) / 16))."""
    W = {k: v.double() for k, v in tensors.items()}
    hidden, heads, layers = config["hidden_size"], config["num_heads"], config["num_hidden_layers"]
    K, Vd = int(hidden * config["expand_k"]) // heads, int(hidden * config["expand_v"]) // heads
    eps = config["norm_eps"]
    F = torch.nn.functional

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    B, T = ids.shape
    x = W["model.embeddings.weight"][ids]
    norm_name = "g_norm_swish_gate" if config.get("fuse_norm", True) else "g_norm"
    for i in range(layers):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = (h @ W[p + "attn.q_proj.weight"].T).view(B, T, heads, K)
        k = (h @ W[p + "attn.k_proj.weight"].T).view(B, T, heads, K)
        v = (h @ W[p + "attn.v_proj.weight"].T).view(B, T, heads, Vd)
        logits = (h @ W[p + "attn.gk_proj.0.weight"].T) @ W[p + "attn.gk_proj.1.weight"].T
        logits = logits + W[p + "attn.gk_proj.1.bias"]
        alpha = torch.exp(F.logsigmoid(logits) / 16).view(B, T, heads, K)
        S = torch.zeros(B, heads, K, Vd, dtype=torch.float64)
        outs = []
        for t in range(T):
            S = alpha[:, t, :, :, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append(K**-0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        o = rms(torch.stack(outs, dim=1), W[p + f"attn.{norm_name}.weight"]).reshape(B, T, -1)
        o = o * F.silu(h @ W[p + "attn.g_proj.weight"].T)
        x = x + o @ W[p + "attn.o_proj.weight"].T
        h = rms(x, W[p + "mlp_norm.weight"])
        mlp = F.silu(h @ W[p + "mlp.gate_proj.weight"].T) * (h @ W[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ W[p + "mlp.down_proj.weight"].T
    head = W["model.embeddings.weight"] if config["tie_word_embeddings"] else W["lm_head.weight"]
    return rms(x, W["model.norm.weight"]) @ head.T


def relative_error(x, ref) -> float:
    x, ref = x.double(), ref.double()
    err = ((x - ref).norm() / ref.norm()).item()
    return float("nan") if math.isnan(err) else err


def cached_logits(model, ids: torch.Tensor, prefill: int = 5) -> torch.Tensor:
    """Logits of every position from a prefill of `prefill` tokens, then one token at a time with the cache."""
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
    return torch.cat(logits, dim=1)
