"""`python -m lasp_hf.convert --from fla-gla`: tiny fla GLA checkpoints written in fla's layout (keys half the
hidden width and values the full width by default, a per-key-channel gate from a rank-16 projection, the fused and
the unfused output norm's name, safetensors and .bin shards, intermediate size given or derived from hidden_ratio,
a tied head) convert into lasp folders whose model gives the logits of a float64 statement of fla's GLA forward
(tests/convert_sources.py), also when decoding with the cache; every fla option the lasp model does not express is
refused, naming the option."""

from __future__ import annotations

import json

import pytest
import torch
from convert_sources import REPO_ROOT, VOCAB, cached_logits, gla_forward64, gla_source, relative_error
from lasp_hf.convert import convert, fla_gla
from lasp_hf.convert.__main__ import main
from transformers import AutoModelForCausalLM

TOL = 1e-4  # float32 model against the float64 statement

CASES = {
    "fused-norm-safetensors": dict(heads=2, fuse_norm=True, fmt="safetensors", num_shards=1),
    "unfused-norm-bin-hidden-ratio": dict(heads=4, fuse_norm=False, intermediate_size=None, hidden_ratio=2,
                                          fmt="bin", num_shards=2),
    "tied-expand-k-1-expand-v-2": dict(heads=2, expand_k=1, expand_v=2, tied=True, num_shards=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_gla_matches_float64_source(tmp_path, case):
    config, tensors = gla_source(tmp_path / "src", **CASES[case])
    out = convert("fla-gla", tmp_path / "src", tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())
    assert saved["token_mixer"] == "gla" and saved["tie_word_embeddings"] == CASES[case].get("tied", False)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = gla_forward64(config, tensors, ids)
    with torch.no_grad():
        logits = model(ids).logits
    assert relative_error(logits, ref) <= TOL
    assert relative_error(cached_logits(model, ids), ref) <= TOL
    prompt = ids[:1, :4]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    assert cached.shape == (1, 12) and torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))


def test_cli_converts_gla(tmp_path, capsys):
    gla_source(tmp_path / "src")
    main(["--from", "fla-gla", str(tmp_path / "src"), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert "wrote" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert model.dtype == torch.bfloat16 and model.config.token_mixer == "gla"


@pytest.mark.parametrize("key, value, match", [
    ("num_kv_heads", 1, "num_kv_heads = 1"),
    ("use_short_conv", True, "use_short_conv"),
    ("attn", {"layers": [1], "num_heads": 2}, "attn"),
    ("feature_map", "relu", "feature_map = 'relu'"),
    ("use_output_gate", False, "use_output_gate"),
    ("clamp_min", -0.5, "clamp_min = -0.5"),
    ("elementwise_affine", False, "elementwise_affine"),
    ("hidden_act", "gelu", "hidden_act = 'gelu'"),
    ("use_gv", True, "use_gv"),
    ("attnres_block_size", 2, "attnres_block_size"),
    ("gate_logit_normalizer", 8, "gate_logit_normalizer = 8"),
    ("gate_low_rank_dim", 32, "gate_low_rank_dim = 32"),
    ("expand_k", 0.3, "expand_k"),
])
def test_unsupported_gla_configs_are_refused(tmp_path, key, value, match):
    src = tmp_path / "src"
    config, _ = gla_source(src)
    (src / "config.json").write_text(json.dumps(dict(config, **{key: value})))
    with pytest.raises(ValueError, match=match):
        convert("fla-gla", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_tensors_are_refused(tmp_path):
    src = tmp_path / "src"
    config, _ = gla_source(src)
    (src / "config.json").write_text(json.dumps(dict(config, num_heads=4)))
    with pytest.raises(ValueError, match="g_norm_swish_gate.weight' has shape"):
        convert("fla-gla", src, tmp_path / "out")
    gla_source(tmp_path / "extra", extra={"model.layers.0.attn.gv_proj.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.attn.gv_proj.weight'"):
        convert("fla-gla", tmp_path / "extra", tmp_path / "out")
    _, tensors = gla_source(tmp_path / "missing")
    del tensors["model.layers.1.attn.gk_proj.1.bias"]
    (tmp_path / "missing" / "model.safetensors").unlink()
    from convert_sources import write_weights

    write_weights(tmp_path / "missing", tensors, "safetensors")
    with pytest.raises(ValueError, match="decay_proj.1.bias"):
        convert("fla-gla", tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="model_type"):
        convert("fla-retnet", src, tmp_path / "out")


def test_gla_preset_is_the_converted_340m_shape():
    """recipes/configs/gla-340m.json is what the converter makes of fla's 340M GLA training config (hidden 1024,
    24 layers, 4 heads, expand_k 0.5, expand_v 1, hidden_ratio 4, tied embeddings, vocab 32000)."""
    from lasp_hf import LaspConfig

    fla_340m = {"model_type": "gla", "attn_mode": "chunk", "bos_token_id": 1, "clamp_min": None, "eos_token_id": 2,
                "expand_k": 0.5, "expand_v": 1, "fuse_cross_entropy": True, "fuse_norm": True, "hidden_act": "swish",
                "hidden_ratio": 4, "hidden_size": 1024, "initializer_range": 0.006, "intermediate_size": None,
                "num_heads": 4, "num_hidden_layers": 24, "norm_eps": 1e-06, "tie_word_embeddings": True,
                "use_cache": True, "use_gk": True, "use_gv": False, "vocab_size": 32000}
    converted = fla_gla.build_config(fla_340m).to_dict()
    preset = LaspConfig.from_json_file(REPO_ROOT / "recipes" / "configs" / "gla-340m.json").to_dict()
    ignored = {"loss_chunk_size", "architectures", "transformers_version"}
    diff = {k: (converted.get(k), preset.get(k)) for k in set(converted) | set(preset)
            if k not in ignored and converted.get(k) != preset.get(k)}
    assert not diff
