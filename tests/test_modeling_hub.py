"""The Hugging Face round trips: Auto classes, save_pretrained / from_pretrained (safetensors),
trust_remote_code in a fresh process that never imported lasp_hf, and the presets in recipes/configs/."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from lasp_hf import LaspConfig, LaspForCausalLM, LaspModel
from test_modeling_common import VOCAB, rel_err, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "configs"
PRESETS = ["tnl-tiny", "tnl-385m", "tnl-1b", "linear-transformer-385m", "hybrid-1b", "gla-340m"]


def test_auto_classes_are_registered():
    config = AutoConfig.for_model(
        "lasp",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        intermediate_size=64,
    )
    assert isinstance(config, LaspConfig)
    assert type(AutoModel.from_config(config)) is LaspModel
    assert type(AutoModelForCausalLM.from_config(config)) is LaspForCausalLM


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip(tmp_path, tie):
    model = tiny_model("gated", ["linear_attention", "full_attention"], tie_word_embeddings=tie)
    x = torch.randint(1, VOCAB, (2, 9))
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "lasp"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lasp.LaspForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_lasp.LaspConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_lasp.LaspModel"
    for name in (
        "modeling_lasp.py",
        "configuration_lasp.py",
        "cache_lasp.py",
        "layers_lasp.py",
        "loss_lasp.py",
    ):
        assert (tmp_path / name).exists(), name
    for loaded in (LaspForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert type(loaded) is LaspForCausalLM
        assert rel_err(loaded.eval()(x).logits, expected) < 1e-6
        tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert tied == tie


def test_load_in_bfloat16_keeps_the_fixed_decay_exact(tmp_path):
    model = tiny_model("lightning")
    model.save_pretrained(tmp_path)
    loaded = LaspForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    for layer, original in zip(loaded.model.layers, model.model.layers):
        assert layer.token_mixer.decay.dtype == torch.float32
        assert torch.equal(layer.token_mixer.decay, original.token_mixer.decay)


_FRESH_PROCESS = r"""
import sys, torch
from transformers import AutoModelForCausalLM
assert "lasp_hf" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
x = torch.load(sys.argv[2])
out = model(x)
generated = model.generate(x, max_new_tokens=5, do_sample=False)
from transformers import AutoModel
# The remote code imported lasp_hf (for the op), which registers its own classes: either copy may serve now.
base = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(base).__name__ == "LaspModel", type(base)
torch.save({"logits": out.logits, "generated": generated}, sys.argv[3])
"""


def test_trust_remote_code_in_a_fresh_process(tmp_path):
    model = tiny_model("lightning", ["full_attention", "linear_attention"])
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    x = torch.randint(1, VOCAB, (2, 7))
    torch.save(x, tmp_path / "x.pt")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
        check=False,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert rel_err(out["logits"], model(x).logits) < 1e-6
    assert torch.equal(out["generated"], model.generate(x, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name, tmp_path):
    config = LaspConfig.from_json_file(CONFIGS / f"{name}.json")
    assert config.model_type == "lasp"
    config.to_json_file(tmp_path / "config.json")
    assert LaspConfig.from_json_file(tmp_path / "config.json").to_dict() == config.to_dict()
    if name == "tnl-tiny":
        assert config.vocab_size == 512
        model = LaspForCausalLM(config)
        x = torch.randint(0, 512, (1, 16))
        assert torch.isfinite(model(x, labels=x).loss)
    if name in ("tnl-1b", "hybrid-1b"):
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 16, 16)
        assert (config.intermediate_size, config.vocab_size, config.head_dim) == (5632, 64000, 128)
    if name == "hybrid-1b":
        assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [3, 7, 11, 15]
    if name == "linear-transformer-385m":
        assert config.token_mixer == "linear"
    if name == "gla-340m":  # fla's 340M GLA: K = 1024 * 0.5 / 4, V = 1024 / 4, SwiGLU 2816 (4 * 1024 * 2 / 3 -> 256s)
        assert (config.token_mixer, config.head_dim, config.value_head_dim) == ("gla", 128, 256)
        assert (config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == (2816, 32000, True)
