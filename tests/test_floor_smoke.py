"""The smoke subset that CI's second stage (tests/run_floor.sh) runs on the oldest transformers, accelerate and
datasets that pyproject.toml accepts: a tiny model's forward, generate, save / load, and two sequence-parallel
training steps on gloo against the unsharded run.

In the first stage (the installed versions) tests/test_train_sp.py and the modeling tests cover all of this at
length, so this module runs only when LASP_FLOOR_STAGE=1 (run_floor.sh sets it).
"""

import os

import pytest
import torch
from test_modeling_common import VOCAB, rel_err, tiny_model
from train_clm_runs import REPO, assert_match, launch_train_clm, per_step

pytestmark = pytest.mark.skipif(
    os.environ.get("LASP_FLOOR_STAGE") != "1", reason="the floor stage's smoke subset (tests/run_floor.sh)"
)


@pytest.mark.parametrize("layer_types", [None, ["linear_attention", "full_attention"]], ids=["linear", "hybrid"])
def test_forward_generate_save_load(layer_types, tmp_path):
    from lasp_hf import LaspForCausalLM

    model = tiny_model("gated", layer_types)
    x = torch.randint(1, VOCAB, (2, 9))
    logits = model(x, use_cache=False).logits
    greedy = model.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy, model.generate(x, max_new_tokens=6, do_sample=False, use_cache=False))
    model.save_pretrained(tmp_path)
    loaded = LaspForCausalLM.from_pretrained(tmp_path).eval()
    assert rel_err(loaded(x, use_cache=False).logits, logits) == 0.0


def test_two_sp_training_steps_equal_the_unsharded_run(tmp_path):
    common = ["--max_steps", "2", "--block_size", "32", "--max_train_samples", "16", "--learning_rate", "3e-3",
              "--logging_steps", "1", "--seed", "0", "--eval_fraction", "0.02", "--save_strategy", "no",
              "--disable_tqdm", "true"]
    launch_train_clm(tmp_path / "unsharded", *common, "--per_device_train_batch_size", "2")
    launch_train_clm(tmp_path / "sp2", *common, "--per_device_train_batch_size", "1",
                     "--gradient_accumulation_steps", "2",
                     config_file=REPO / "recipes" / "accelerate" / "cpu_sp2.yaml")
    reference = per_step(tmp_path / "unsharded", "loss")
    assert_match(per_step(tmp_path / "sp2", "loss"), reference, [1, 2], "loss", 1e-4)  # fp32 summation order
