"""A converted TransNormerLLM (LRPE, 5 heads, tied head, sqrt(hidden) embedding scale) fine-tuned with
`accelerate launch recipes/train_clm.py --model_name_or_path <converted>` on 2 gloo processes under SP = 2: the
per-step losses equal the unsharded run's (fp32), and the run learns."""

import shutil

import pytest
from convert_sources import SHIPPED_TOKENIZER, tnl_source
from lasp_hf.convert import convert
from train_clm_runs import REPO, assert_match, launch_train_clm, per_step

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 4
COMMON = ["--max_steps", str(STEPS), "--block_size", "64", "--max_train_samples", "16", "--learning_rate", "3e-3",
          "--logging_steps", "1", "--seed", "0", "--eval_fraction", "0.02", "--save_strategy", "no",
          "--disable_tqdm", "true"]


def test_converted_model_trains_under_sp_like_unsharded(tmp_path):
    tnl_source(tmp_path / "src", heads=5, lrpe_list=(1, 0, 1), vocab=512)
    shutil.copytree(SHIPPED_TOKENIZER, tmp_path / "src", dirs_exist_ok=True)
    model = str(convert("transnormer", tmp_path / "src", tmp_path / "tnl"))
    launch_train_clm(tmp_path / "unsharded", *COMMON, "--model_name_or_path", model,
                     "--per_device_train_batch_size", "2")
    launch_train_clm(tmp_path / "sp2", *COMMON, "--model_name_or_path", model, "--per_device_train_batch_size", "1",
                     "--gradient_accumulation_steps", "2", config_file=REPO / "recipes/accelerate/cpu_sp2.yaml")
    reference = per_step(tmp_path / "unsharded", "loss")
    assert_match(per_step(tmp_path / "sp2", "loss"), reference, range(1, STEPS + 1), "loss", 1e-4)
    assert reference[STEPS] < reference[1]
