"""A misspelled LaspConfig key is reported by name with the closest field, and --eval_strategy without an eval
set names the flag that gives one. Before: `intermediat_size` was ignored (a model of the default width trained)
and the Trainer failed with its generic message."""

import importlib.util
import json
import logging
import pathlib

import pytest
from lasp_hf import LaspConfig

REPO = pathlib.Path(__file__).resolve().parents[1]


def _train_clm():
    spec = importlib.util.spec_from_file_location("train_clm_recipe", REPO / "recipes" / "train_clm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_presets_and_a_saved_config_have_no_unknown_keys(tmp_path):
    for path in sorted((REPO / "recipes" / "configs").glob("*.json")):
        assert LaspConfig.unknown_keys(json.loads(path.read_text())) == [], path.name
    LaspConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(tmp_path)
    assert LaspConfig.unknown_keys(json.loads((tmp_path / "config.json").read_text())) == []


def test_train_clm_refuses_a_misspelled_key_naming_the_closest_field(tmp_path):
    config = json.loads((REPO / "recipes" / "configs" / "tnl-tiny.json").read_text())
    config["intermediat_size"] = config.pop("intermediate_size", 128)
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(config))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "data" / "tokenizer"))
    with pytest.raises(ValueError, match=r"unknown keys 'intermediat_size' \(did you mean 'intermediate_size'\?\)"):
        _train_clm().build_model(str(path), tokenizer)


def test_from_pretrained_warns_about_keys_of_another_version(tmp_path, caplog):
    LaspConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["some_future_option"] = 3
    data["num_hiden_layers"] = 4
    (tmp_path / "config.json").write_text(json.dumps(data))
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            config = LaspConfig.from_pretrained(tmp_path)
    finally:
        hf_logging.disable_propagation()
    assert config.num_hidden_layers == 2
    assert "'some_future_option'" in caplog.text
    assert "'num_hiden_layers' (did you mean 'num_hidden_layers'?)" in caplog.text


def test_eval_strategy_without_an_eval_set_names_the_flag():
    with pytest.raises(ValueError, match="--eval_strategy steps needs an eval set: pass --eval_fraction"):
        _train_clm().parse_args(["--output_dir", "unused", "--eval_strategy", "steps"])
