"""`python -m lasp_hf.convert --from fla-retnet`: tiny fla RetNet checkpoints written in fla's layout (value
heads twice the key heads, the fused and the unfused output norm's name, safetensors and .bin shards, intermediate
size given or derived from hidden_ratio) convert into lasp folders whose model gives the logits of a float64
statement of fla's RetNet forward (tests/convert_sources.py), also when decoding with the cache."""

from __future__ import annotations

import json

import pytest
import torch
from convert_sources import VOCAB, cached_logits, relative_error, retnet_forward64, retnet_source
from lasp_hf.convert import convert
from transformers import AutoModelForCausalLM

TOL = 1e-4  # float32 model against the float64 statement

CASES = {
    "fused-norm-safetensors": dict(heads=2, fuse_norm=True, fmt="safetensors", num_shards=1),
    "unfused-norm-bin-hidden-ratio": dict(heads=4, fuse_norm=False, intermediate_size=None, hidden_ratio=2,
                                          fmt="bin", num_shards=2),
    "tied-expand-k-2": dict(heads=2, expand_k=2, expand_v=1, tied=True, num_shards=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_retnet_matches_float64_source(tmp_path, case):
    config, tensors = retnet_source(tmp_path / "src", **CASES[case])
    out = convert("fla-retnet", tmp_path / "src", tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = retnet_forward64(config, tensors, ids)
    with torch.no_grad():
        logits = model(ids).logits
    assert relative_error(logits, ref) <= TOL
    assert relative_error(cached_logits(model, ids), ref) <= TOL
    prompt = ids[:1, :4]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_unsupported_retnet_configs_are_refused(tmp_path):
    src = tmp_path / "src"
    config, _ = retnet_source(src)
    for key, value, match in (
        ("num_kv_heads", 1, "num_kv_heads"),
        ("use_short_conv", True, "use_short_conv"),
        ("attn", {"layers": [1], "num_heads": 2}, "attn"),
        ("feature_map", "relu", "feature_map"),
    ):
        (src / "config.json").write_text(json.dumps(dict(config, **{key: value})))
        with pytest.raises(ValueError, match=match):
            convert("fla-retnet", src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps(dict(config, num_heads=4)))
    with pytest.raises(ValueError, match="g_norm_swish_gate.weight' has shape"):
        convert("fla-retnet", src, tmp_path / "out")
