"""Training under LASP on CPU processes (gloo), through `accelerate launch recipes/train_clm.py`.

The reference is the unsharded run: one process, a batch of 2 blocks per step. The same steps are
taken by SP = 2 (2 processes; 1 block per micro-batch, 2 gradient-accumulation micro-batches) and by
DP = 2 x SP = 2 (4 processes, 1 block each, with activation checkpointing and activations offloaded to
CPU memory); fp32, a fixed seed, the same sampler order, so the
per-step losses must agree to float32 rounding. The SP degree comes from
recipes/accelerate/cpu_sp2.yaml (its `# lasp_sequence_parallel_size: 2` line).
"""

import json
import os
import sys

import pytest
import torch
from train_clm_runs import (
    REPO,
    assert_match,
    free_port,
    history,
    launch_train_clm,
    per_step,
    run_in_own_group,
    saved_model_eval_loss,
)

CPU_SP2 = REPO / "recipes" / "accelerate" / "cpu_sp2.yaml"
BLOCK = 64
NUM_STEPS = 10
COMMON = [
    "--max_steps", str(NUM_STEPS), "--block_size", str(BLOCK), "--max_train_samples", "64",
    "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "0", "--eval_fraction", "0.02",
    "--save_strategy", "steps", "--save_steps", "5", "--disable_tqdm", "true",
]
RTOL = 1e-4  # fp32: the sharded runs sum the same token losses in another order

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch(output_dir, *args, num_processes=None, **kwargs):
    """`accelerate launch --config_file cpu_sp2.yaml train_clm.py` (plain python when num_processes == 0)."""
    config = None if num_processes == 0 else CPU_SP2
    return launch_train_clm(output_dir, *COMMON, *args, config_file=config, num_processes=num_processes, **kwargs)


def step_losses(output_dir):
    return per_step(output_dir, "loss")


def eval_loss(output_dir):
    return [entry["eval_loss"] for entry in history(output_dir) if "eval_loss" in entry][-1]


def assert_losses_match(losses, reference, steps):
    assert_match(losses, reference, steps, "loss", RTOL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_sp")
    launch(root / "unsharded", "--per_device_train_batch_size", "2", num_processes=0)
    launch(root / "sp2", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2")
    launch(root / "dp2_sp2", "--per_device_train_batch_size", "1", "--gradient_checkpointing",
           "--offload_activations", "true", num_processes=4)
    return root


def test_sp2_losses_equal_the_unsharded_run(runs):
    reference = step_losses(runs / "unsharded")
    assert_losses_match(step_losses(runs / "sp2"), reference, range(1, NUM_STEPS + 1))
    # The run learns: otherwise equal losses would prove little.
    assert reference[NUM_STEPS] < reference[1] - 0.1


def test_dp2_sp2_losses_equal_the_unsharded_run(runs):
    assert_losses_match(step_losses(runs / "dp2_sp2"), step_losses(runs / "unsharded"), range(1, NUM_STEPS + 1))


def test_logs_report_tokens_per_second_and_peak_memory(runs):
    entries = [entry for entry in history(runs / "sp2") if "loss" in entry]
    # Every token counted once over the SP group: 2 blocks of 64 tokens per step.
    assert entries[0]["num_input_tokens_seen"] == 2 * BLOCK
    assert all(entry["train_tokens_per_second"] > 0 and entry["peak_memory_gb"] > 0 for entry in entries)


def test_resumed_run_logs_the_same_next_losses(runs, tmp_path):
    checkpoint = runs / "sp2" / "checkpoint-5"
    assert checkpoint.is_dir()
    launch(tmp_path / "resumed", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
           "--resume_from_checkpoint", str(checkpoint))
    uninterrupted = step_losses(runs / "sp2")
    resumed = step_losses(tmp_path / "resumed")
    # The resumed run's history starts with the checkpoint's (steps 1-5), then its own steps.
    assert sorted(resumed) == list(range(1, NUM_STEPS + 1))
    for step in range(6, NUM_STEPS + 1):
        err = abs(resumed[step] - uninterrupted[step]) / abs(uninterrupted[step])
        assert err <= 1e-6, (step, resumed[step], uninterrupted[step])


@pytest.mark.parametrize("run", ["sp2", "dp2_sp2"])
def test_eval_loss_is_the_token_weighted_loss_of_the_saved_model(runs, run):
    """Reference: each eval block alone through the saved model, cross-entropy summed in float64."""
    reference = saved_model_eval_loss(runs / run, BLOCK)
    logged = eval_loss(runs / run)
    assert abs(logged - reference) <= 1e-5 * reference, (logged, reference)


def test_sp_size_that_does_not_divide_the_world_stops_before_training(tmp_path):
    result = launch(tmp_path / "bad", "--sequence_parallel_size", "3", "--block_size", "96", expect_ok=False)
    assert result.returncode != 0
    assert "sequence_parallel_size = 3" in result.stderr + result.stdout
    assert "must divide the number of processes, got 2" in result.stderr + result.stdout
    assert not (tmp_path / "bad" / "trainer_state.json").exists()


def _wait_on_a_silent_peer(timeout_s, silence_s):
    import datetime
    import time

    import torch.distributed as dist
    from lasp_hf.parallel import init_sequence_parallel

    sp = init_sequence_parallel(2, timeout=datetime.timedelta(seconds=timeout_s))
    if sp.rank == 1:
        time.sleep(silence_s)  # a hung rank: never joins the collective
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=sp.group)
    except RuntimeError as error:
        return time.monotonic() - start, str(error)
    return time.monotonic() - start, None


def test_a_hung_rank_fails_the_others_within_the_sp_timeout():
    """The SP groups carry the trainer's `ddp_timeout` (LaspTrainer passes it to init_sequence_parallel)."""
    from distributed_utils import run_distributed

    elapsed, error = run_distributed(_wait_on_a_silent_peer, 2, 2.0, 5.0, timeout_s=120.0)[0]
    assert error is not None, "the collective with a silent peer returned instead of failing"
    assert elapsed < 4.5, f"failed only after {elapsed:.1f} s; the SP group's timeout was 2 s"


def test_plain_accelerate_loop_dp2_sp2_with_checkpointing_equals_the_unsharded_loop(tmp_path):
    """recipes/train_accelerate_loop.py: 4 processes (DP 2 x SP 2 from cpu_sp2.yaml) with activation checkpointing
    against one process with 2 blocks per step."""
    loop = REPO / "recipes" / "train_accelerate_loop.py"
    common = ["--max_steps", "6", "--block_size", str(BLOCK), "--max_train_samples", "64", "--learning_rate", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LASP_SEQUENCE_PARALLEL_SIZE", None)
    commands = {
        "unsharded": [sys.executable, str(loop), *common, "--batch_size", "2"],
        "dp2_sp2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_SP2),
                    "--num_processes", "4", "--main_process_port", str(free_port()), str(loop), *common,
                    "--batch_size", "1", "--gradient_checkpointing"],
    }
    logs = {}
    for name, command in commands.items():
        log_file = tmp_path / f"{name}.json"
        result = run_in_own_group([*command, "--log_file", str(log_file)], env, timeout=300)
        assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        logs[name] = json.loads(log_file.read_text())
    assert logs["dp2_sp2"]["sequence_parallel_size"] == 2
    reference, sharded = logs["unsharded"]["losses"], logs["dp2_sp2"]["losses"]
    assert len(sharded) == len(reference) == 6
    for step, (loss, ref) in enumerate(zip(sharded, reference), 1):
        assert abs(loss - ref) <= RTOL * abs(ref), f"step {step}: {loss} vs unsharded {ref}"


def test_bf16_sp2_follows_the_fp32_unsharded_run(runs, tmp_path):
    """Mixed precision under SP: bf16 autocast, float32 states and loss; within the bf16 tolerance."""
    launch(tmp_path / "bf16", "--per_device_train_batch_size", "2", "--bf16", "--save_strategy", "no")
    reference, losses = step_losses(runs / "unsharded"), step_losses(tmp_path / "bf16")
    for step in range(1, NUM_STEPS + 1):
        assert abs(losses[step] - reference[step]) <= 1e-2 * abs(reference[step]), (step, losses[step])


def _check_batches(same: bool):
    import types

    import torch.distributed as dist
    from lasp_hf.parallel import init_sequence_parallel
    from lasp_hf.training import LaspTrainer

    trainer = types.SimpleNamespace(sp_context=init_sequence_parallel(2), _checked_same_batch=False)
    ids = torch.arange(8)[None] + (0 if same else dist.get_rank())
    try:
        LaspTrainer._check_same_batch_across_sp(trainer, {"input_ids": ids})
    except ValueError as error:
        return str(error)
    return trainer._checked_same_batch


def test_ranks_of_an_sp_group_with_different_batches_are_stopped():
    from distributed_utils import run_distributed

    assert run_distributed(_check_batches, 2, True) == [True, True]
    for message in run_distributed(_check_batches, 2, False):
        assert "received different batches" in message


def _fsdp2_sp_gradients(config_kwargs, ids, labels, across_dp):
    import torch.distributed as dist
    from lasp_hf import LaspConfig, LaspForCausalLM
    from lasp_hf.parallel import init_sequence_parallel
    from lasp_hf.parallel.sharding import shard_batch_for_sp
    from lasp_hf.training import global_target_tokens, local_target_tokens, loss_multiplier, scale_loss
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = LaspForCausalLM(LaspConfig(**config_kwargs))
    sp = init_sequence_parallel(2)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # parameters sharded over all 4 ranks, gradients averaged over all 4
    batch = shard_batch_for_sp({"input_ids": ids[sp.dp_rank], "labels": labels[sp.dp_rank]}, sp)
    num_tokens = global_target_tokens(local_target_tokens([batch]), sp, across_dp)
    loss = scale_loss(model(**batch, loss_reduction="sum").loss, num_tokens, loss_multiplier(sp, across_dp))
    loss.backward()
    logged = loss.detach().clone()
    dist.all_reduce(logged)
    return {name: p.grad.full_tensor() for name, p in model.named_parameters()}, logged.item() / dist.get_world_size()


@pytest.mark.parametrize("across_dp", [True, False])
def test_fsdp2_dp2_sp2_gradient_is_the_unsharded_gradient(across_dp):
    """torch FSDP2 (fully_shard over 4 CPU ranks, gloo), DP 2 x SP 2: the averaged gradient of the scaled loss is the
    gradient of the unsharded loss, and the logged mean is that loss. Tokens averaged across DP: the mean over all
    tokens of both sequences; not across DP: the mean of the two sequences' mean losses."""
    from distributed_utils import relative_error, run_distributed
    from lasp_hf import LaspConfig, LaspForCausalLM

    config_kwargs = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "head_dim": 16, "intermediate_size": 64}
    ids = torch.randint(0, 64, (2, 1, 32), generator=torch.Generator().manual_seed(1))  # one sequence per DP group
    ids[1, 0, 5:] = 7  # the two sequences have different losses
    labels = ids.clone()
    labels[1, 0, :12] = -100  # and different numbers of targets, so the two reductions differ
    grads, logged = run_distributed(_fsdp2_sp_gradients, 4, config_kwargs, ids, labels, across_dp)[0]
    torch.manual_seed(0)
    reference = LaspForCausalLM(LaspConfig(**config_kwargs))  # float32: the op has no float64 path
    full, full_labels = ids[:, 0], labels[:, 0]  # [2, 32]: both sequences, unsharded
    if across_dp:
        loss = reference(input_ids=full, labels=full_labels).loss
    else:
        loss = sum(reference(input_ids=full[g:g + 1], labels=full_labels[g:g + 1]).loss for g in range(2)) / 2
    loss.backward()
    assert abs(logged - loss.item()) <= 1e-5 * loss.item()
    for name, p in reference.named_parameters():
        assert relative_error(grads[name], p.grad) <= 1e-4, name


def test_a_worker_that_outlives_its_launcher_cannot_stall_the_tests():
    """The harness's timeout also kills workers in sessions of their own that keep the launcher's output open (a rank
    hung at exit once held CI until its 90-minute limit)."""
    import time

    orphan = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
              "start_new_session=True)")
    start = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish in 2 s"):
        command = [sys.executable, "-c", orphan + "; import time; time.sleep(600)"]
        run_in_own_group(command, dict(os.environ), timeout=2)
    assert time.monotonic() - start < 30
