"""The fused decoding step (`lasp_hf.kernels.triton.decode.fused_linear` and the blocks' `decode_step`) on CPU
tensors in Triton's interpreter: the kernel against a float64 statement of its math (norm over the row or per
group, norm weight, gate, up to four weights with their activations, GLU, residual; one row and several), and
every token mixer's decoding step against the plain PyTorch path of the same model, which must also be what
runs where the fused step does not apply (gradients on, autocast, mixed dtypes).

As in test_triton_interpret.py, the tests run in a subprocess started with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from interpreter_harness import needs_interpreter, outside_interpreter, run_in_interpreter_subprocess
from triton_reference64 import rel_err

# float32 through the interpreter is numpy float32 (~1e-7 here). bfloat16: the kernel rounds the normed input, the
# products, the activation and the GLU's product (2^-9 each, relative); the interpreter (Triton 3.9) truncates
# float32 -> bfloat16 casts instead of rounding them (a bias of -2^-9 per cast: 522 of 1024 random values differ
# from torch's rounding), and a GLU output passes about eight casts: 4e-2. The GPU tests hold it to 1e-2.
TOL_FP32 = 1e-5
TOL_BF16 = 4e-2

ACTS64 = {"identity": lambda t: t, "silu": F.silu, "sigmoid": torch.sigmoid, "elu_plus_one": lambda t: F.elu(t) + 1}


@outside_interpreter
def test_in_interpreter_subprocess():
    run_in_interpreter_subprocess(__file__)


@pytest.fixture
def poisoned():
    from lasp_hf.kernels.triton import utils

    utils.POISON_OUTPUTS = True
    yield
    utils.POISON_OUTPUTS = False


def fused_reference64(x, weights, acts, glu=False, norm_eps=None, norm_weight=None, norm_group=None, gate=None,
                      residual=None):
    """The fused projections' math in float64, without any intermediate rounding."""
    x = x.double()
    if norm_eps is not None:
        G = norm_group or x.shape[1]
        groups = x.view(x.shape[0], -1, G)
        x = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + norm_eps)).reshape(x.shape)
        if norm_weight is not None:
            x = x * norm_weight.double().repeat(x.shape[1] // norm_weight.numel())
    if gate is not None:
        x = x * gate.double()
    products = [x @ w.double().T for w in weights]
    if glu:
        return (ACTS64[acts[0]](products[0]) * products[1],)
    outputs = [ACTS64[a](p) for a, p in zip(acts, products, strict=True)]
    if residual is not None:
        outputs[0] = outputs[0] + residual.double()
    return tuple(outputs)


CASES = {
    "four-weights-row-norm": dict(num=4, acts=["silu", "elu_plus_one", "identity", "sigmoid"], norm=True,
                                  weight=True),
    "two-weights-no-norm": dict(num=2, acts=["identity", "silu"]),
    "group-norm-gate-residual": dict(num=1, acts=["identity"], norm=True, weight=True, group=32, gate=True,
                                     residual=True),
    "row-norm-gate-residual": dict(num=1, acts=["identity"], norm=True, gate=True, residual=True),
    "glu-silu": dict(num=2, acts=["silu", "identity"], glu=True, norm=True, weight=True),
    "glu-identity-residual-free": dict(num=2, acts=["identity", "identity"], glu=True),
}


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_linear_matches_float64(poisoned, case, M, dtype):
    from lasp_hf.kernels.triton.decode import fused_linear

    spec = CASES[case]
    gen = torch.Generator().manual_seed(0)
    D = 96 if spec.get("group") is None else 128  # 96: a block of the row (256 wide) is partly masked
    # Output widths that are not multiples of the row block (ragged last blocks), equal for the GLU's pair.
    rows = [40, 40] if spec.get("glu") else [40, 24, 56, 8][: spec["num"]]
    x = torch.randn(M, D, generator=gen).to(dtype)
    weights = [(torch.randn(n, D, generator=gen) / D**0.5).to(dtype) for n in rows]
    kwargs = {}
    if spec.get("norm"):
        kwargs["norm_eps"] = 1e-6
        if spec.get("group"):
            kwargs["norm_group"] = spec["group"]
        if spec.get("weight"):
            kwargs["norm_weight"] = (torch.rand(spec.get("group") or D, generator=gen) + 0.5).to(dtype)
    if spec.get("gate"):
        kwargs["gate"] = torch.randn(M, D, generator=gen).to(dtype)
    if spec.get("residual"):
        kwargs["residual"] = torch.randn(M, rows[0], generator=gen).to(dtype)
    outputs = fused_linear(x, weights, acts=spec["acts"], glu=spec.get("glu", False), **kwargs)
    expected = fused_reference64(x, weights, spec["acts"], glu=spec.get("glu", False), **kwargs)
    assert len(outputs) == len(expected)
    tol = TOL_FP32 if dtype == torch.float32 else TOL_BF16
    for out, ref in zip(outputs, expected, strict=True):
        assert out.dtype == dtype and out.shape == ref.shape
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < tol, (case, rel_err(out, ref))


# ----------------------------------------------------------------------------- the blocks' decoding step

MIXERS = {
    "lightning": dict(token_mixer="lightning"),
    "lightning-lrpe-hybrid": dict(token_mixer="lightning", position_encoding="lrpe",
                                  layer_types=["linear_attention", "full_attention"]),
    "linear-elu": dict(token_mixer="linear", feature_map="elu"),
    "gated": dict(token_mixer="gated"),
    "gla-per-head-norm": dict(token_mixer="gla", value_head_dim=32, output_norm="per_head", norm_type="rmsnorm",
                              output_gate_act="silu", channel_mixer="swiglu"),
    "retnet-rope-wide-values": dict(token_mixer="lightning", position_encoding="rope", decay_schedule="retnet",
                                    qk_activation="identity", value_head_dim=32, output_norm="per_head",
                                    norm_type="rmsnorm", output_gate_act="silu", channel_mixer="swiglu"),
}


def tiny_model(spec, dtype=torch.float32):
    from lasp_hf import LaspConfig, LaspForCausalLM

    torch.manual_seed(0)
    config = LaspConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                        intermediate_size=96, **spec)
    return LaspForCausalLM(config).to(dtype).eval()


@pytest.fixture
def counted(monkeypatch):
    """Counts the fused kernel's launches; restores FUSED_DECODE."""
    from lasp_hf.modeling import layers_lasp

    calls = []
    original = layers_lasp.fused_linear

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(layers_lasp, "fused_linear", counting)
    monkeypatch.setattr(layers_lasp, "FUSED_DECODE", layers_lasp.FUSED_DECODE)
    return calls


def decode_logits(model, ids, mode: str, mask=None):
    """Logits of the last token of ids, decoded as one step after a cached prefill of the others."""
    from lasp_hf.modeling import layers_lasp

    layers_lasp.FUSED_DECODE = "never"
    prefix_mask = None if mask is None else mask[:, :-1]
    out = model(ids[:, :-1], attention_mask=prefix_mask, use_cache=True)
    layers_lasp.FUSED_DECODE = mode
    step = model(ids[:, -1:], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return step.logits[:, -1], step.past_key_values


@needs_interpreter
@pytest.mark.parametrize("mixer", list(MIXERS))
def test_decode_step_matches_plain_path(counted, mixer):
    model = tiny_model(MIXERS[mixer])
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, plain_cache = decode_logits(model, ids, "never")
        assert counted == []
        fused, fused_cache = decode_logits(model, ids, "always")
    # Per block: q / k / v (/ gate), o_proj (linear blocks); the GLU's pair and down projection (every block).
    linear_blocks = sum(t == "linear_attention" for t in model.config.layer_types)
    assert len(counted) == 2 * linear_blocks + 2 * model.config.num_hidden_layers
    assert rel_err(fused, plain.double()) < TOL_FP32
    for layer in range(model.config.num_hidden_layers):
        if model.config.layer_types[layer] == "linear_attention":
            state, ref = fused_cache.get_state(layer), plain_cache.get_state(layer)
            assert rel_err(state, ref.double()) < TOL_FP32


@needs_interpreter
def test_decode_step_with_left_padding(counted):
    """A padded batch (left pads in the prompt) decodes its new token as the plain path does."""
    model = tiny_model(MIXERS["gated"])
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        plain, _ = decode_logits(model, ids, "never", mask)
        fused, _ = decode_logits(model, ids, "always", mask)
    assert counted and rel_err(fused, plain.double()) < TOL_FP32


@needs_interpreter
def test_decode_step_bf16(counted):
    model = tiny_model(MIXERS["lightning"], torch.bfloat16)
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain, _ = decode_logits(model, ids, "never")
        fused, _ = decode_logits(model, ids, "always")
    assert counted and fused.dtype == torch.bfloat16
    assert rel_err(fused, plain.double()) < TOL_BF16


@needs_interpreter
def test_plain_path_where_fused_does_not_apply(counted):
    """Gradients on, or autocast: the plain path runs (it alone has autograd and autocast's casts)."""
    from lasp_hf.modeling import layers_lasp

    model = tiny_model(MIXERS["gla-per-head-norm"])
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    out = model(ids[:, :-1], use_cache=True)
    layers_lasp.FUSED_DECODE = "always"
    step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)  # gradients on
    assert step.logits.requires_grad and counted == []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    assert counted == []


@needs_interpreter
def test_graph_decoder_takes_the_fused_step(counted):
    """The graph decoder's fixed-shape step (run eagerly on CPU) uses the fused kernels, and generate's greedy
    tokens with the static cache equal those of the plain path."""
    from lasp_hf.modeling import layers_lasp

    model = tiny_model(MIXERS["lightning"])
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    layers_lasp.FUSED_DECODE = "never"
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert counted == []
    layers_lasp.FUSED_DECODE = "always"
    fused = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert counted
    assert torch.equal(fused, plain)


@needs_interpreter
def test_per_head_norm_of_odd_width_takes_the_plain_mixer(counted):
    """A per-head output norm over 24 channels (not a power of two) is not one of the kernel's blocks: the mixer
    runs its plain path (no error), the GLU still takes the kernels, and the logits are the plain path's."""
    spec = {**MIXERS["gla-per-head-norm"], "value_head_dim": 24}
    model = tiny_model(spec)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain, _ = decode_logits(model, ids, "never")
        fused, _ = decode_logits(model, ids, "always")
    assert counted == [2, 1] * model.config.num_hidden_layers  # the GLU's pair, then its down projection
    assert rel_err(fused, plain.double()) < TOL_FP32
