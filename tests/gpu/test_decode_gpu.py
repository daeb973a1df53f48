"""The fused decoding step on a GPU: `fused_linear` at tnl-1b's shapes (hidden 2048, 16 heads of 128, GLU 5632)
for batch sizes 1, 32 and 64 against float64, and a bf16 model's decoding step against its plain PyTorch path.
bf16 rule of tests/gpu/test_triton_gpu.py: relative error <= 1e-2."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_decode_fused import MIXERS, counted, decode_logits, fused_reference64  # noqa: E402,F401 (counted: a fixture)
from triton_reference64 import rel_err  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL_BF16 = 1e-2


@pytest.mark.parametrize("M", [1, 32, 64])
@pytest.mark.parametrize(
    "case",
    ["qkvu", "o_proj", "glu", "down", "per-head-norm"],
)
def test_fused_linear_tnl_1b_shapes(case, M):
    from lasp_hf.kernels.triton.decode import fused_linear

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    hidden, inner = 2048, 5632
    kwargs, acts, glu = {}, None, False
    if case == "qkvu":
        x, weights = randn(M, hidden), [randn(hidden, hidden, scale=hidden**-0.5) for _ in range(4)]
        acts, kwargs = ["silu", "silu", "identity", "sigmoid"], {"norm_eps": 1e-6}
    elif case == "o_proj":
        x, weights = randn(M, hidden), [randn(hidden, hidden, scale=hidden**-0.5)]
        kwargs = {"norm_eps": 1e-6, "gate": randn(M, hidden), "residual": randn(M, hidden)}
    elif case == "glu":
        x, weights = randn(M, hidden), [randn(inner, hidden, scale=hidden**-0.5) for _ in range(2)]
        acts, glu, kwargs = ["silu", "identity"], True, {"norm_eps": 1e-6, "norm_weight": randn(hidden) + 1}
    elif case == "down":
        x, weights = randn(M, inner), [randn(hidden, inner, scale=inner**-0.5)]
        kwargs = {"residual": randn(M, hidden)}
    else:
        x, weights = randn(M, 4096), [randn(hidden, 4096, scale=4096**-0.5)]
        kwargs = {"norm_eps": 1e-6, "norm_group": 256, "norm_weight": randn(256) + 1, "gate": randn(M, 4096)}
    acts = acts or ["identity"] * len(weights)
    outputs = fused_linear(x, weights, acts=acts, glu=glu, **kwargs)
    expected = fused_reference64(x, weights, acts, glu=glu, **kwargs)
    for out, ref in zip(outputs, expected, strict=True):
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL_BF16, (case, M, rel_err(out, ref))


@pytest.mark.parametrize("mixer", ["lightning", "gla-per-head-norm", "lightning-lrpe-hybrid"])
def test_decode_step_matches_plain_path_bf16(counted, mixer):
    from lasp_hf import LaspConfig, LaspForCausalLM
    torch.manual_seed(0)
    config = LaspConfig(vocab_size=512, hidden_size=512, num_hidden_layers=2, num_attention_heads=4, head_dim=128,
                        intermediate_size=1024, **{**MIXERS[mixer], "value_head_dim": None})
    model = LaspForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 512, (4, 65), device="cuda")
    with torch.no_grad():
        plain, _ = decode_logits(model, ids, "never")
        assert counted == []
        fused, _ = decode_logits(model, ids, "auto")
    assert counted, "the fused step did not run on CUDA"
    assert rel_err(fused, plain.double()) < TOL_BF16
