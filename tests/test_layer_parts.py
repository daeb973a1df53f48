"""The parts a linear-attention layer is composed of (modeling/parts_lasp.py), each against a float64 statement
of its math written here, and the layer with the published models' choices of parts (TransNormerLLM: LRPE, ALiBi
slopes for any head count; fla RetNet: RoPE, RetNet's decay, values twice as wide, per-head output norm; fla GLA: a
decay per key channel from a low-rank gate, values twice as wide, per-head output norm, swish gate) against a
float64 recurrence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lasp_hf import LaspConfig
from lasp_hf.modeling.layers_lasp import LaspLinearAttention
from lasp_hf.modeling.parts_lasp import (
    DECAY_KINDS,
    GatedChannelDecay,
    GatedHeadDecay,
    decay_kind,
    LinearLrpe,
    LinearRotary,
    alibi_slopes,
    build_qk_activation,
    fixed_decay,
    norm_per_head,
)
from lasp_hf.modeling.layers_lasp import LaspRMSNorm
from test_modeling_common import tiny_config


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def test_qk_activations():
    x = torch.randn(50, dtype=torch.float64)
    assert torch.allclose(build_qk_activation("silu")(x), x / (1 + torch.exp(-x)))
    assert torch.allclose(build_qk_activation("elu")(x), torch.where(x > 0, x + 1, torch.exp(x)))
    assert torch.equal(build_qk_activation("identity")(x), x)


def test_lrpe_is_cos_sin_of_theta_times_position_and_relative():
    B, T, H, D = 2, 7, 3, 4
    lrpe = LinearLrpe(H, D)
    i = torch.arange(H * D, dtype=torch.float64)
    torch.testing.assert_close(lrpe.theta.double(), (10000.0 ** (-2 * i / (H * D))).view(H, D), rtol=1e-6, atol=0)
    with torch.no_grad():
        lrpe.theta.mul_(1 + torch.rand(H, D))
    x = torch.randn(B, T, H, D)
    pos = torch.arange(100, 100 + T).expand(B, T)
    out = lrpe(x, pos)
    angle = pos.double()[:, :, None, None] * lrpe.theta.double()
    ref = torch.cat([x.double() * angle.cos(), x.double() * angle.sin()], dim=-1)
    assert out.shape == (B, T, H, 2 * D) and rel_err(out, ref) < 1e-5
    # q_n . k_m depends on n - m only: the same scores at positions shifted by 1000.
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    scores = torch.einsum("bnhd,bmhd->bhnm", lrpe(q, pos), lrpe(k, pos))
    shifted = torch.einsum("bnhd,bmhd->bhnm", lrpe(q, pos + 1000), lrpe(k, pos + 1000))
    assert rel_err(shifted, scores) < 1e-4


def test_rotary_is_rotate_half():
    B, T, H, D = 2, 5, 2, 8
    rope = LinearRotary(D, 10000.0)
    x = torch.randn(B, T, H, D)
    pos = torch.arange(3, 3 + T).expand(B, T)
    out = rope(x, pos).double()
    xd = x.double()
    ref = torch.empty_like(xd)
    for j in range(D // 2):  # channel j pairs with j + D / 2, rotated by pos * 10000^(-2j / D)
        a = pos.double()[:, :, None] * 10000.0 ** (-2 * j / D)
        ref[..., j] = xd[..., j] * a.cos() - xd[..., j + D // 2] * a.sin()
        ref[..., j + D // 2] = xd[..., j + D // 2] * a.cos() + xd[..., j] * a.sin()
    assert rel_err(out, ref) < 1e-6


def test_alibi_slopes_for_any_head_count():
    assert alibi_slopes(8) == [2.0 ** -(h + 1) for h in range(8)]
    # TransNormerLLM2-3B's 20 heads: 16 slopes 2^(-0.5 i), then 2^(-0.25 i) for i = 1, 3, 5, 7.
    expected = [2.0 ** (-0.5 * i) for i in range(1, 17)] + [2.0 ** (-0.25 * i) for i in (1, 3, 5, 7)]
    assert alibi_slopes(20) == pytest.approx(expected, rel=1e-15)
    assert alibi_slopes(5) == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1], rel=1e-15)


def test_fixed_decay_schedules():
    cfg = tiny_config(num_hidden_layers=3, num_attention_heads=4, decay_schedule="lightning_alibi")
    legacy = tiny_config(num_hidden_layers=3, num_attention_heads=4)
    for layer in range(3):
        torch.testing.assert_close(fixed_decay(cfg, layer), fixed_decay(legacy, layer), rtol=1e-7, atol=0)
    cfg = tiny_config(hidden_size=40, num_hidden_layers=3, num_attention_heads=5, decay_schedule="lightning_alibi")
    slopes = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1], dtype=torch.float64)
    torch.testing.assert_close(fixed_decay(cfg, 1).double(), -slopes * (1 - 0.5 + 1e-5), rtol=1e-6, atol=0)
    cfg = tiny_config(num_attention_heads=4, decay_schedule="retnet")
    ref = torch.tensor([math.log(1 - 2.0 ** (-5 - h)) for h in range(4)], dtype=torch.float64)
    for layer in range(2):
        torch.testing.assert_close(fixed_decay(cfg, layer).double(), ref, rtol=1e-6, atol=0)


def test_gated_head_decay_keeps_parameter_names():
    decay = GatedHeadDecay(16, 4, 2, normalizer=16.0)
    assert sorted(n for n, _ in decay.named_parameters()) == ["0.weight", "1.bias", "1.weight"]
    x = torch.randn(3, 5, 16)
    ref = F.logsigmoid(F.linear(F.linear(x.double(), decay[0].weight.double()), decay[1].weight.double(),
                                decay[1].bias.double())) / 16
    assert rel_err(decay(x), ref) < 1e-6


def test_gated_channel_decay_is_logsigmoid_over_normalizer_per_key_channel():
    decay = GatedChannelDecay(16, 4, num_heads=2, head_dim=3, normalizer=16.0)
    assert sorted(n for n, _ in decay.named_parameters()) == ["0.weight", "1.bias", "1.weight"]
    assert decay[1].weight.shape == (6, 4)
    with torch.no_grad():
        decay[1].bias.normal_(0, 8)
    x = torch.randn(3, 5, 16)
    logits = F.linear(F.linear(x.double(), decay[0].weight.double()), decay[1].weight.double(), decay[1].bias.double())
    ref = (-torch.log1p(torch.exp(-logits)) / 16).view(3, 5, 2, 3)  # log(sigmoid(z)) = -log(1 + e^-z)
    g = decay(x)
    assert g.shape == (3, 5, 2, 3) and g.dtype == torch.float32 and rel_err(g, ref) < 1e-6
    assert decay_kind(tiny_config("gla")) == "gated_channel" and "gated_channel" in DECAY_KINDS


def test_per_head_norm():
    norm = LaspRMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    o = torch.randn(2, 3, 4, 6)
    od = o.double()
    ref = od / torch.sqrt(od.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert rel_err(norm_per_head(norm, o), ref.reshape(2, 3, 24)) < 1e-6


def _recurrence(q, k, v, g, scale):
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    out = []
    for t in range(T):
        S = S * g.exp()[None, :, None, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * (q[:, t, :, None, :] @ S).squeeze(-2))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("published", ["transnormer", "retnet"])
def test_layer_with_published_parts_matches_float64(published):
    B, T, H, D = 2, 9, 4, 8
    if published == "transnormer":
        extra = dict(decay_schedule="lightning_alibi", position_encoding="lrpe", output_gate_act="identity",
                     norm_type="srmsnorm")
    else:
        extra = dict(decay_schedule="retnet", position_encoding="rope", qk_activation="identity",
                     attention_scale=D**-0.5, value_head_dim=2 * D, output_norm="per_head", output_gate_act="silu",
                     norm_type="rmsnorm")
    config = tiny_config(num_attention_heads=H, **extra)
    mixer = LaspLinearAttention(config, layer_idx=0)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name != "position.theta":
                p.normal_(0, 0.3)
    x = torch.randn(B, T, 32)
    pos = torch.arange(T).expand(B, T) + 4  # a slice that starts at global position 4
    out = mixer(x, position_ids=pos)

    xd, n = x.double(), pos.double()
    lin = lambda m: F.linear(xd, m.weight.double())  # noqa: E731
    q, k = (lin(m).view(B, T, H, D) for m in (mixer.q_proj, mixer.k_proj))
    v = lin(mixer.v_proj).view(B, T, H, -1)
    if published == "transnormer":
        q, k = F.silu(q), F.silu(k)
        angle = n[:, :, None, None] * mixer.position.theta.double()
        q = torch.cat([q * angle.cos(), q * angle.sin()], dim=-1)
        k = torch.cat([k * angle.cos(), k * angle.sin()], dim=-1)
        g = -torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64) * (1 + 1e-5)
        o = _recurrence(q, k, v, g, 1.0).reshape(B, T, -1)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * lin(mixer.u_proj)
    else:
        freqs = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        a = n[:, :, None, None] * freqs
        rot = lambda t: torch.cat([t[..., :D // 2] * a.cos() - t[..., D // 2:] * a.sin(),  # noqa: E731
                                   t[..., D // 2:] * a.cos() + t[..., :D // 2] * a.sin()], dim=-1)
        g = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64)))
        o = _recurrence(rot(q), rot(k), v, g, D**-0.5)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * mixer.o_norm.weight.double()
        o = o.reshape(B, T, -1) * F.silu(lin(mixer.u_proj))
    ref = F.linear(o, mixer.o_proj.weight.double())
    assert rel_err(out, ref) < 1e-4


def _gla_recurrence(q, k, v, g, scale):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t; g `[B, T, H, K]`."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    out = []
    for t in range(T):
        S = g[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * (q[:, t, :, None, :] @ S).squeeze(-2))
    return torch.stack(out, dim=1)


def _gla_mixer(H=2, D=8, **extra):
    config = tiny_config("gla", num_attention_heads=H, head_dim=D, value_head_dim=2 * D, output_norm="per_head",
                         output_gate_act="silu", norm_type="rmsnorm", **extra)
    torch.manual_seed(0)
    mixer = LaspLinearAttention(config, layer_idx=0)
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.3)
        mixer.decay_proj[1].bias.normal_(0, 8)  # decays from ~1 to ~exp(-1) per token
    return config, mixer


def _gla_reference(mixer, x, D):
    B, T, _ = x.shape
    H = mixer.num_heads
    xd = x.double()
    lin = lambda m: F.linear(xd, m.weight.double())  # noqa: E731
    q, k = (lin(m).view(B, T, H, D) for m in (mixer.q_proj, mixer.k_proj))
    v = lin(mixer.v_proj).view(B, T, H, 2 * D)
    z = F.linear(lin(mixer.decay_proj[0]), mixer.decay_proj[1].weight.double(), mixer.decay_proj[1].bias.double())
    g = (-torch.log1p(torch.exp(-z)) / 16).view(B, T, H, D)
    o = _gla_recurrence(q, k, v, g, D**-0.5)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * mixer.o_norm.weight.double()
    o = o.reshape(B, T, -1) * F.silu(lin(mixer.u_proj))
    return F.linear(o, mixer.o_proj.weight.double())


def test_layer_with_gla_parts_matches_float64():
    """fla's GLA layer: per-key-channel decay, scale D^-0.5, values 2D wide, per-head RMSNorm, swish gate; also
    prefill + decoding steps (the op's step with g [B, H, K]) and right padding (a pad neither adds nor decays)."""
    from lasp_hf.modeling.cache_lasp import LaspCache

    B, T, D = 2, 9, 8
    config, mixer = _gla_mixer(D=D)
    x = torch.randn(B, T, 32)
    ref = _gla_reference(mixer, x, D)
    assert rel_err(mixer(x), ref) < 1e-4
    with torch.no_grad():
        cache = LaspCache(config)
        outs = [mixer(x[:, :4], cache=cache)]
        outs += [mixer(x[:, t:t + 1], cache=cache) for t in range(4, T)]
    assert rel_err(torch.cat(outs, dim=1), ref) < 1e-4
    # Right padding: the state after the real tokens is the state of the unpadded row.
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        padded_cache, alone_cache = LaspCache(config), LaspCache(config)
        padded = mixer(x, mask=mask, cache=padded_cache)
        alone = mixer(x[1:, :6], cache=alone_cache)
    assert rel_err(padded[1:, :6], alone) < 1e-5
    assert rel_err(padded_cache.get_state(0)[1:], alone_cache.get_state(0)) < 1e-5


def test_gla_layer_chunks_and_gradients():
    """attention_chunk_size gives the unchunked output and gradients (the per-channel g is chunked on the token
    axis like q, k, v); gradients reach the decay projection."""
    B, T, D = 2, 11, 8
    _, mixer = _gla_mixer(D=D)
    x = torch.randn(B, T, 32, requires_grad=True)
    params = [x, *mixer.parameters()]
    whole = mixer(x)
    ref = torch.autograd.grad(whole.square().sum(), params)
    mixer.config.attention_chunk_size = 4
    chunked = mixer(x)
    grads = torch.autograd.grad(chunked.square().sum(), params)
    assert rel_err(chunked, whole) < 1e-6
    for a, b in zip(ref, grads, strict=True):
        assert rel_err(b, a) < 1e-5
    names = [n for n, _ in mixer.named_parameters()]
    bias_grad = ref[1 + names.index("decay_proj.1.bias")]
    assert bias_grad.abs().sum() > 0


def test_position_encoding_layers_and_defaults():
    config = tiny_config(num_hidden_layers=3, position_encoding="lrpe", position_encoding_layers=[1])
    kinds = [type(LaspLinearAttention(config, i).position).__name__ for i in range(3)]
    assert kinds == ["NoPositionEncoding", "LinearLrpe", "NoPositionEncoding"]
    default = LaspConfig()
    assert (default.position_encoding, default.output_norm, default.embedding_scale) == ("none", "all_heads", 1.0)
    assert default.value_head_dim == default.head_dim and default.decay_schedule is None
    with pytest.raises(ValueError, match="decay_schedule applies to the 'lightning'"):
        tiny_config("gated", decay_schedule="retnet")
    with pytest.raises(ValueError, match="token_mixer='gla' decays each of the head_dim key channels"):
        tiny_config("gla", position_encoding="lrpe")
    with pytest.raises(ValueError, match="decay_schedule applies to the 'lightning'"):
        tiny_config("gla", decay_schedule="retnet")
    with pytest.raises(ValueError, match="position_encoding_layers"):
        tiny_config(position_encoding="rope", position_encoding_layers=[5])


@pytest.mark.parametrize("published", ["retnet", "gla"])
def test_value_blocks_equal_one_call(monkeypatch, published):
    """Values wider than the kernels' widest tile run as column blocks (fla RetNet's 512; GLA-1.3B's 512 with its
    per-key-channel decay, which every block shares): outputs, gradients, the cache and a decoding step are those
    of one call."""
    from lasp_hf.modeling import layers_lasp
    from lasp_hf.modeling.cache_lasp import LaspCache

    if published == "retnet":
        config = tiny_config(num_attention_heads=2, value_head_dim=32, decay_schedule="retnet",
                             position_encoding="rope", output_norm="per_head", norm_type="rmsnorm")
    else:
        config = tiny_config("gla", num_attention_heads=2, value_head_dim=32, output_norm="per_head",
                             output_gate_act="silu", norm_type="rmsnorm")
    torch.manual_seed(0)
    mixer = LaspLinearAttention(config, layer_idx=0)
    x = torch.randn(2, 9, 32, requires_grad=True)
    pos = torch.arange(9).expand(2, 9)

    def run():
        cache = LaspCache(config)
        out = mixer(x, position_ids=pos, cache=cache)
        step = mixer(x[:, -1:], position_ids=pos[:, -1:] + 1, cache=cache)
        grads = torch.autograd.grad(out.square().sum(), [x, *mixer.parameters()])
        return out, step, cache.get_state(0), grads

    whole = run()
    monkeypatch.setattr(layers_lasp, "MAX_VALUE_BLOCK", 8)
    blocks = run()
    for a, b in zip(whole[:3], blocks[:3], strict=True):
        assert rel_err(b, a) < 1e-6
    for a, b in zip(whole[3], blocks[3], strict=True):
        assert rel_err(b, a) < 1e-5
