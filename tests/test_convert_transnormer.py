"""`python -m lasp_hf.convert --from transnormer`: tiny TransNormerLLM checkpoints written in the Hub layout
(safetensors and .bin shards, tied and untied heads, LRPE on some layers, 5 heads for ALiBi's interleaved slopes,
embedding scale, silu / no q-k activation) convert into lasp folders whose model gives the logits of a float64
statement of TransNormerLLM's forward (tests/convert_sources.py), also when decoding with the cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from convert_sources import SHIPPED_TOKENIZER, VOCAB, cached_logits, relative_error, tnl_forward64, tnl_source
from lasp_hf.convert import convert
from transformers import AutoModelForCausalLM, AutoTokenizer

TOL = 1e-4  # float32 model against the float64 statement


def _load(out):
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()


def _ids(T=12, B=2, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


CASES = {
    # 5 heads (ALiBi's interleaved slopes), LRPE on layers 0 and 2, tied head absent from the shards,
    # sqrt(hidden) embedding scale, safetensors shards.
    "tied-lrpe-5heads-safetensors": dict(heads=5, lrpe_list=(1, 0, 1), tied=True, fmt="safetensors", num_shards=2),
    # Untied head, no LRPE, no scale, no q/k activation, .bin shards with a fairseq version entry.
    "untied-bin": dict(heads=4, layers=2, lrpe_list=(0, 0), tied=False, no_scale_embedding=True, act="none",
                       fmt="bin", num_shards=3, extra={"decoder.version": torch.tensor([3.0])}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_transnormer_matches_float64_source(tmp_path, case):
    config, tensors = tnl_source(tmp_path / "src", **CASES[case])
    shutil.copytree(SHIPPED_TOKENIZER, tmp_path / "src", dirs_exist_ok=True)
    out = convert("transnormer", tmp_path / "src", tmp_path / "out")
    model = _load(out)
    ids = _ids()
    ref = tnl_forward64(config, tensors, ids)
    with torch.no_grad():
        logits = model(ids).logits
    assert relative_error(logits, ref) <= TOL
    assert relative_error(cached_logits(model, ids), ref) <= TOL
    saved = json.loads((out / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_lasp.LaspForCausalLM"
    assert saved["tie_word_embeddings"] == CASES[case]["tied"] and saved["pad_token_id"] == 0
    assert AutoTokenizer.from_pretrained(out).vocab_size == AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).vocab_size


def test_greedy_generation_with_cache_equals_without(tmp_path):
    tnl_source(tmp_path / "src", heads=5, lrpe_list=(1, 0, 1))
    model = _load(convert("transnormer", tmp_path / "src", tmp_path / "out"))
    prompt = _ids(T=6, B=1)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 16) and torch.equal(cached, uncached)


def test_cli_writes_bf16_shards(tmp_path):
    tnl_source(tmp_path / "src", heads=4, layers=2, lrpe_list=(1, 0))
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "lasp_hf.convert", "--from", "transnormer", str(tmp_path / "src"), str(out),
         "--dtype", "bfloat16", "--max_shard_size", "20KB"],
        check=True, capture_output=True,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.dtype == torch.bfloat16
    assert model.model.layers[0].token_mixer.position.theta.shape == (4, 8)


def test_errors_name_what_is_wrong(tmp_path):
    src = tmp_path / "src"
    config, _ = tnl_source(src, heads=4, layers=2, lrpe_list=(1, 0))
    with pytest.raises(ValueError, match="unknown source layout 'mamba'"):
        convert("mamba", src, tmp_path / "a")
    with pytest.raises(ValueError, match="model_type"):
        convert("fla-retnet", src, tmp_path / "b")
    for bad, match in (
        (dict(extra={"model.layers.0.token_mixer.extra.weight": torch.zeros(2)}), "unexpected tensor 'model.layers.0"),
        (dict(glu=40), None),
    ):
        shutil.rmtree(src)
        tnl_source(src, heads=4, layers=2, lrpe_list=(1, 0), **bad)
        if match is None:  # the shards say glu 40, the config 48: a shape error naming the tensor
            cfg = json.loads((src / "config.json").read_text())
            cfg["glu_dim"] = 48
            (src / "config.json").write_text(json.dumps(cfg))
            match = "channel_mixer.l1.weight' has shape"
        with pytest.raises(ValueError, match=match):
            convert("transnormer", src, tmp_path / "c")
        assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
    shutil.rmtree(src)
    tnl_source(src, heads=4, layers=2, lrpe_list=(1, 0), num_shards=1, fmt="safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.channel_mixer.l2.weight"]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(ValueError, match="lacks tensors.*layers.1.channel_mixer.up_proj"):
        convert("transnormer", src, tmp_path / "d")
    cfg = dict(config, norm_type="layernorm")
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="norm_type"):
        convert("transnormer", src, tmp_path / "e")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        convert("transnormer", src, tmp_path / "f")
