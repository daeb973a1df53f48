"""Converted published models on a GPU (Triton kernels):

- a tiny RetNet made by flash-linear-attention itself (`fla.models.RetNetForCausalLM`, random weights, saved with
  its own save_pretrained) converted with `--from fla-retnet`: float32 logits against fla's own model and against
  the float64 statement of RetNet's forward (tests/convert_sources.py), and 32 greedy tokens identical to fla's
  generate (each with its own cache);
- a tiny GLA made by flash-linear-attention (`fla.models.GLAForCausalLM`, fla-hub's 340M head shape: key heads of
  128, value heads of 256) converted with `--from fla-gla`: the same checks against fla's model, the float64
  statement of GLA's forward and fla's greedy tokens (the per-key-channel kernels, prefill and decoding step);
- a tiny TransNormerLLM checkpoint (5 heads, LRPE) converted with `--from transnormer`: float32 logits against the
  float64 statement of TransNormerLLM's forward (the Hub code needs its own Triton kernels and is not installed).

fla's float32 kernels may multiply in TF32; the bound against fla is then twice fla's own error against float64.
In bf16 (both models cast), lasp's logits must be no further from float64 than twice fla's (DESIGN's bf16 rule).
Errors land in $LASP_HF_TEST_OUT/convert_errors.json when that variable is set.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convert_sources import (  # noqa: E402
    gla_forward64,
    relative_error,
    retnet_forward64,
    tnl_forward64,
    tnl_source,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = 1e-4  # float32
ERRORS: dict = {}


def _record(name, **errors):
    ERRORS[name] = errors
    out = os.environ.get("LASP_HF_TEST_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "convert_errors.json").write_text(json.dumps(ERRORS, indent=2))
    print(name, errors)


@pytest.fixture(scope="module")
def fla_retnet(tmp_path_factory):
    models = pytest.importorskip("fla.models")
    torch.manual_seed(0)
    config = models.RetNetConfig(
        # fla-hub's RetNet head shape (key heads of 256, value heads of 512: the layer runs two value blocks).
        hidden_size=512, num_heads=2, num_hidden_layers=2, vocab_size=1000, expand_k=1, expand_v=2,
        hidden_ratio=2, fuse_norm=True, fuse_swiglu=True, initializer_range=0.1,
    )
    model = models.RetNetForCausalLM(config)
    src = tmp_path_factory.mktemp("fla") / "retnet"
    model.save_pretrained(src)
    return model.cuda().float().eval(), src


@torch.no_grad()
def _fla_greedy(model, prompt, steps):
    """fla's model decoding greedily with its own cache (a plain loop: no dependence on generate()'s glue)."""
    out = model(input_ids=prompt, use_cache=True)
    tokens = [prompt]
    for _ in range(steps):
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(next_id)
        out = model(input_ids=next_id, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1)


def test_fla_retnet_logits_and_greedy_tokens(fla_retnet, tmp_path):
    from lasp_hf.convert import convert
    from transformers import AutoModelForCausalLM

    fla_model, src = fla_retnet
    out = convert("fla-retnet", src, tmp_path / "lasp")
    lasp = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).cuda().eval()
    ids = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
    config = json.loads((src / "config.json").read_text())
    state = {k: v.detach().cpu() for k, v in fla_model.state_dict().items()}
    ref = retnet_forward64(config, state, ids.cpu())
    with torch.no_grad():
        ours, theirs = lasp(ids).logits.cpu(), fla_model(ids).logits.cpu()
    errors = dict(lasp_vs_float64=relative_error(ours, ref), fla_vs_float64=relative_error(theirs, ref),
                  lasp_vs_fla=relative_error(ours, theirs))
    prompt = ids[:1, :16]
    kwargs = dict(max_new_tokens=32, do_sample=False, min_new_tokens=32)
    ours_tokens = lasp.generate(prompt, use_cache=True, pad_token_id=0, **kwargs)
    theirs_tokens = _fla_greedy(fla_model, prompt, 32)
    errors["greedy_tokens_equal"] = bool(torch.equal(ours_tokens.cpu(), theirs_tokens.cpu()))
    with torch.no_grad():
        ours16 = lasp.to(torch.bfloat16)(ids).logits.float().cpu()
        theirs16 = copy.deepcopy(fla_model).to(torch.bfloat16)(ids).logits.float().cpu()
    errors.update(lasp_bf16_vs_float64=relative_error(ours16, ref), fla_bf16_vs_float64=relative_error(theirs16, ref),
                  lasp_bf16_vs_fla_bf16=relative_error(ours16, theirs16))
    _record("fla-retnet", **errors)
    assert errors["lasp_vs_float64"] <= TOL
    assert errors["lasp_vs_fla"] <= max(TOL, 2 * errors["fla_vs_float64"])
    assert ours_tokens.shape == (1, 48) and errors["greedy_tokens_equal"]
    assert errors["lasp_bf16_vs_float64"] <= 2 * errors["fla_bf16_vs_float64"]


@pytest.fixture(scope="module")
def fla_gla(tmp_path_factory):
    models = pytest.importorskip("fla.models")
    torch.manual_seed(0)
    config = models.GLAConfig(
        # fla-hub's gla-340M head shape: 4 heads, keys 1024 * 0.5 / 4 = 128, values 1024 / 4 = 256.
        hidden_size=1024, num_heads=4, num_hidden_layers=2, vocab_size=1000, expand_k=0.5, expand_v=1,
        hidden_ratio=4, fuse_norm=True, fuse_swiglu=True, initializer_range=0.1,
    )
    model = models.GLAForCausalLM(config)
    with torch.no_grad():  # spread the gate's decays (a zero bias makes every channel decay alike, ~0.96)
        for layer in model.model.layers:
            layer.attn.gk_proj[1].bias.normal_(0, 8)
    src = tmp_path_factory.mktemp("fla") / "gla"
    model.save_pretrained(src)
    return model.cuda().float().eval(), src


def test_fla_gla_logits_and_greedy_tokens(fla_gla, tmp_path):
    from lasp_hf.convert import convert
    from transformers import AutoModelForCausalLM

    fla_model, src = fla_gla
    out = convert("fla-gla", src, tmp_path / "lasp")
    lasp = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).cuda().eval()
    assert lasp.config.token_mixer == "gla" and (lasp.config.head_dim, lasp.config.value_head_dim) == (128, 256)
    ids = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
    config = json.loads((src / "config.json").read_text())
    state = {k: v.detach().cpu() for k, v in fla_model.state_dict().items()}
    ref = gla_forward64(config, state, ids.cpu())
    with torch.no_grad():
        ours, theirs = lasp(ids).logits.cpu(), fla_model(ids).logits.cpu()
    errors = dict(lasp_vs_float64=relative_error(ours, ref), fla_vs_float64=relative_error(theirs, ref),
                  lasp_vs_fla=relative_error(ours, theirs))
    prompt = ids[:1, :16]
    kwargs = dict(max_new_tokens=32, do_sample=False, min_new_tokens=32)
    ours_tokens = lasp.generate(prompt, use_cache=True, pad_token_id=0, **kwargs)
    uncached_tokens = lasp.generate(prompt, use_cache=False, pad_token_id=0, **kwargs)
    theirs_tokens = _fla_greedy(fla_model, prompt, 32)
    errors["greedy_tokens_equal"] = bool(torch.equal(ours_tokens.cpu(), theirs_tokens.cpu()))
    errors["cached_equals_uncached"] = bool(torch.equal(ours_tokens, uncached_tokens))
    with torch.no_grad():
        ours16 = lasp.to(torch.bfloat16)(ids).logits.float().cpu()
        theirs16 = copy.deepcopy(fla_model).to(torch.bfloat16)(ids).logits.float().cpu()
    errors.update(lasp_bf16_vs_float64=relative_error(ours16, ref), fla_bf16_vs_float64=relative_error(theirs16, ref),
                  lasp_bf16_vs_fla_bf16=relative_error(ours16, theirs16))
    _record("fla-gla", **errors)
    assert errors["lasp_vs_float64"] <= TOL
    assert errors["lasp_vs_fla"] <= max(TOL, 2 * errors["fla_vs_float64"])
    assert ours_tokens.shape == (1, 48) and errors["greedy_tokens_equal"] and errors["cached_equals_uncached"]
    assert errors["lasp_bf16_vs_float64"] <= 2 * errors["fla_bf16_vs_float64"]


def test_transnormer_logits_on_gpu(tmp_path):
    from lasp_hf.convert import convert
    from transformers import AutoModelForCausalLM

    config, tensors = tnl_source(tmp_path / "src", heads=5, head_dim=16, layers=3, glu=96, lrpe_list=(1, 0, 1),
                                 vocab=500)
    out = convert("transnormer", tmp_path / "src", tmp_path / "lasp")
    lasp = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).cuda().eval()
    ids = torch.randint(3, 500, (2, 300), generator=torch.Generator().manual_seed(0))
    ref = tnl_forward64(config, tensors, ids)
    with torch.no_grad():
        ours = lasp(ids.cuda()).logits.cpu()
        prompt = ids[:1, :16].cuda()
        cached = lasp.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        uncached = lasp.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0,
                                 use_cache=False)
    errors = dict(lasp_vs_float64=relative_error(ours, ref), cached_equals_uncached=bool(torch.equal(cached, uncached)))
    _record("transnormer", **errors)
    assert errors["lasp_vs_float64"] <= TOL and errors["cached_equals_uncached"]
