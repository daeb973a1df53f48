"""Training under LASP with DeepSpeed ZeRO 1 / 2 / 3 on CPU processes (gloo), through `accelerate launch`.

The reference is the unsharded run: one process, plain torch, a batch of 2 blocks per step. Each ZeRO
stage takes the same steps with SP = 2 (recipes/accelerate/cpu_deepspeed_zero{1,2,3}_sp2.yaml): ZeRO-2
and ZeRO-3 on 2 processes, 1 block per micro-batch, 2 gradient-accumulation micro-batches; ZeRO-1 on 4
processes, DP 2 x SP 2, 1 block each: DeepSpeed shards the
optimizer states (1), the gradients too (2) and the parameters too (3), averages the gradients over the
2 ranks, clips them to norm 1 (`max_grad_norm`, which is active here: the norms are about 3) and steps
its own copy of AdamW. fp32, a fixed seed and the same sampler order, so the per-step losses and
gradient norms must agree with the unsharded run's to float32 rounding.

Skipped where DeepSpeed is not installed (`pip install lasp-hf[deepspeed]`).
"""

import pathlib

import pytest
import torch

pytest.importorskip("deepspeed")

from train_clm_runs import REPO, assert_match, history, launch_train_clm, per_step, saved_model_eval_loss

BLOCK = 64
NUM_STEPS = 6
COMMON = [
    "--max_steps", str(NUM_STEPS), "--block_size", str(BLOCK), "--max_train_samples", "64",
    "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "0", "--eval_fraction", "0.02",
    "--disable_tqdm", "true",
]
SHARDED = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"]  # SP 2: 2 blocks a step
RTOL = 1e-4  # fp32: the sharded runs sum the same token losses in another order
STAGES = (1, 2, 3)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def config_file(stage: int) -> pathlib.Path:
    return REPO / "recipes" / "accelerate" / f"cpu_deepspeed_zero{stage}_sp2.yaml"


def launch(output_dir, *args, stage=None, num_processes=None, timeout=300):
    """`accelerate launch --config_file cpu_deepspeed_zero{stage}_sp2.yaml train_clm.py` (plain python if no stage);
    returns what it printed."""
    result = launch_train_clm(output_dir, *COMMON, *args, config_file=config_file(stage) if stage else None,
                              num_processes=num_processes, timeout=timeout)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_deepspeed")
    launch(root / "unsharded", "--per_device_train_batch_size", "2", "--save_strategy", "no")
    # ZeRO-1 as DP 2 x SP 2 (4 processes, 1 block each); ZeRO-2 and 3 as SP 2 with gradient accumulation.
    logs = {1: launch(root / "zero1", "--per_device_train_batch_size", "1", "--save_strategy", "no", stage=1,
                      num_processes=4)}
    logs[2] = launch(root / "zero2", *SHARDED, "--save_strategy", "no", stage=2)
    logs[3] = launch(root / "zero3", *SHARDED, "--save_strategy", "steps", "--save_steps", "3", stage=3)
    logs["zero3_bf16"] = launch(root / "zero3_bf16", *SHARDED, "--bf16", "--save_strategy", "no", stage=3)
    return root, logs


def test_runs_are_deepspeed_with_sp2(runs):
    """Guards the test itself: the runs really went through DeepSpeed, with 2 sequence-parallel ranks."""
    _, logs = runs
    for stage in STAGES:
        num_dp_groups = 2 if stage == 1 else 1
        assert f"{num_dp_groups} data-parallel groups x 2 sequence-parallel ranks" in logs[stage]
        assert "DEEPSPEED" in logs[stage], f"ZeRO-{stage} run did not use DeepSpeed"
        assert "train with plain data parallelism" not in logs[stage]


def test_zero3_partitions_every_parameter(runs):
    """Guards the test itself: under ZeRO-3 no rank held a whole parameter (a tiny model's would stay whole at
    DeepSpeed's default persistence threshold). A rank's checkpoint keeps the module's tensors as it held them."""
    root, _ = runs
    (states,) = (root / "zero3" / "checkpoint-3").glob("global_step3/zero_pp_rank_0_mp_rank_00_model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert module and all(tensor.numel() == 0 for tensor in module.values()), {
        name: tuple(tensor.shape) for name, tensor in module.items() if tensor.numel()}


@pytest.mark.parametrize("stage", STAGES)
def test_zero_losses_and_grad_norms_equal_the_unsharded_run(runs, stage):
    root, _ = runs
    steps = range(1, NUM_STEPS + 1)
    assert_match(per_step(root / f"zero{stage}", "loss"), per_step(root / "unsharded", "loss"), steps, "loss",
                 RTOL)
    # The norm before clipping: DeepSpeed's, over its shards, against torch's over the whole model.
    assert_match(per_step(root / f"zero{stage}", "grad_norm"), per_step(root / "unsharded", "grad_norm"), steps,
                 "grad_norm", RTOL)
    reference = per_step(root / "unsharded", "loss")
    assert reference[NUM_STEPS] < reference[1] - 0.05  # the run learns: otherwise equal losses would prove little


def test_zero3_bf16_follows_the_fp32_unsharded_run(runs):
    """The GPU recipes' setting: DeepSpeed's bf16 (model cast to bf16, fp32 master weights in the optimizer)."""
    root, _ = runs
    assert_match(per_step(root / "zero3_bf16", "loss"), per_step(root / "unsharded", "loss"), range(1, NUM_STEPS + 1),
                 "loss", rtol=1e-2)


def test_zero3_saved_model_gives_the_logged_eval_loss(runs):
    """The model saved from ZeRO-3 (parameters gathered from the 2 ranks) evaluates to the eval loss the run
    logged. Reference: each eval block alone through the saved model, cross-entropy summed in float64."""
    root, _ = runs
    reference = saved_model_eval_loss(root / "zero3", BLOCK)
    logged = [entry["eval_loss"] for entry in history(root / "zero3") if "eval_loss" in entry][-1]
    assert abs(logged - reference) <= 1e-5 * reference, (logged, reference)


def test_zero3_resumed_run_logs_the_same_next_losses(runs, tmp_path):
    """Resuming from the ZeRO-3 checkpoint of step 3 (partitioned parameters and optimizer states per rank)."""
    root, _ = runs
    checkpoint = root / "zero3" / "checkpoint-3"
    assert checkpoint.is_dir()
    launch(tmp_path / "resumed", *SHARDED, "--save_strategy", "no", "--resume_from_checkpoint", str(checkpoint),
           stage=3)
    uninterrupted, resumed = per_step(root / "zero3", "loss"), per_step(tmp_path / "resumed", "loss")
    assert sorted(resumed) == list(range(1, NUM_STEPS + 1))
    for step in range(4, NUM_STEPS + 1):
        err = abs(resumed[step] - uninterrupted[step]) / abs(uninterrupted[step])
        assert err <= 1e-6, (step, resumed[step], uninterrupted[step])
