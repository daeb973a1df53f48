"""LaspTrainer / LaspTrainingArguments in one process: where the SP degree comes from, and the errors
that stop a bad run before any step (the multi-process runs are in test_train_sp.py)."""

import importlib.util
import pathlib
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from lasp_hf import LaspConfig, LaspForCausalLM
from lasp_hf.training import LaspTrainer, LaspTrainingArguments, PackedBlockCollator, with_shift_labels
from lasp_hf.training.loss import scale_loss
from lasp_hf.training.sp_config import (
    consume_accelerate_sp_env,
    launcher_config_file,
    resolve_sequence_parallel_size,
    sp_size_from_config_file,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "recipes" / "accelerate"


def tiny_model():
    config = LaspConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                        intermediate_size=32)
    return LaspForCausalLM(config)


def blocks(num_blocks, block_size):
    ids = torch.randint(3, 32, (num_blocks, block_size)).tolist()
    return Dataset.from_dict({"input_ids": ids, "position_ids": [list(range(block_size))] * num_blocks,
                              "labels": ids})


def args(tmp_path, **kwargs):
    return LaspTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


@pytest.fixture(autouse=True)
def _no_sp_env(monkeypatch):
    for name in ("LASP_SEQUENCE_PARALLEL_SIZE", "PARALLELISM_CONFIG_SP_BACKEND", "PARALLELISM_CONFIG_SP_SIZE"):
        monkeypatch.delenv(name, raising=False)


# ---- where W comes from ------------------------------------------------------------------------------

def test_shipped_configs_carry_their_sp_size():
    expected = {"cpu_sp2": 2, "ddp_sp2": 2, "ddp_sp4": 4, "deepspeed_zero1_sp4": 4, "deepspeed_zero2_sp4": 4,
                "deepspeed_zero3_sp4": 4}
    for name, size in expected.items():
        assert sp_size_from_config_file(ACCELERATE_CONFIGS / f"{name}.yaml") == size, name


def test_shipped_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted(ACCELERATE_CONFIGS.glob("*.yaml")):
        load_config_from_file(str(path))  # raises on unknown keys


def test_fsdp2_configs_use_parallelism_config_with_the_lasp_backend():
    from accelerate.commands.config.config_args import load_config_from_file

    for name, size in {"fsdp2_sp2": 2, "fsdp2_sp4": 4, "fsdp2_sp8": 8, "fsdp2_dp2_sp2": 2}.items():
        config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
        assert config.parallelism_config["parallelism_config_sp_backend"] == "lasp"
        assert config.parallelism_config["parallelism_config_sp_size"] == size


def test_directive_in_a_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distributed_type: MULTI_GPU\n# lasp_sequence_parallel_size: 8\n")
    assert sp_size_from_config_file(path) == 8
    path.write_text("distributed_type: MULTI_GPU\n")
    assert sp_size_from_config_file(path) is None
    path.write_text("# lasp_sequence_parallel_size: two\n")
    with pytest.raises(ValueError, match="'two'"):
        sp_size_from_config_file(path)


def test_launcher_config_file_is_read_from_the_parent_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "accelerate", "launch",
                                "--config_file", str(path), "train.py"])
    try:
        for _ in range(100):  # until the child has exec'd (before that /proc shows pytest's command line)
            if b"accelerate" in pathlib.Path(f"/proc/{process.pid}/cmdline").read_bytes():
                break
            time.sleep(0.05)
        assert launcher_config_file(process.pid) == str(path)
    finally:
        process.kill()
        process.wait()
    assert launcher_config_file() is None  # pytest's parent is not accelerate launch


def test_accelerate_parallelism_env_is_consumed_before_accelerate_sees_it():
    environ = {"PARALLELISM_CONFIG_SP_BACKEND": "lasp", "PARALLELISM_CONFIG_SP_SIZE": "4",
               "PARALLELISM_CONFIG_SP_SEQ_LENGTH": "None", "PARALLELISM_CONFIG_DP_SHARD_SIZE": "1",
               "ACCELERATE_USE_PARALLELISM_CONFIG": "true"}
    assert consume_accelerate_sp_env(environ) == 4
    assert not any(key.startswith("PARALLELISM_CONFIG_SP") for key in environ)
    assert environ["ACCELERATE_USE_PARALLELISM_CONFIG"] == "false"
    # DeepSpeed-Ulysses (accelerate's own sp) is left alone.
    ulysses = {"PARALLELISM_CONFIG_SP_BACKEND": "deepspeed", "PARALLELISM_CONFIG_SP_SIZE": "4"}
    assert consume_accelerate_sp_env(ulysses) is None and ulysses["PARALLELISM_CONFIG_SP_SIZE"] == "4"
    with pytest.raises(ValueError, match="other parallelism_config sizes"):
        consume_accelerate_sp_env({"PARALLELISM_CONFIG_SP_BACKEND": "lasp", "PARALLELISM_CONFIG_SP_SIZE": "2",
                                   "PARALLELISM_CONFIG_TP_SIZE": "2"})


def test_precedence_flag_then_env_then_accelerate():
    environ = {"LASP_SEQUENCE_PARALLEL_SIZE": "2", "PARALLELISM_CONFIG_SP_BACKEND": "lasp",
               "PARALLELISM_CONFIG_SP_SIZE": "4"}
    assert resolve_sequence_parallel_size(8, dict(environ)) == (8, "--sequence_parallel_size")
    assert resolve_sequence_parallel_size(None, dict(environ))[0] == 2
    environ.pop("LASP_SEQUENCE_PARALLEL_SIZE")
    assert resolve_sequence_parallel_size(None, environ)[0] == 4
    # accelerate's variables are consumed, and W stays available to later readers in the process.
    assert environ == {"LASP_SEQUENCE_PARALLEL_SIZE": "4", "ACCELERATE_USE_PARALLELISM_CONFIG": "false"}
    assert resolve_sequence_parallel_size(None, environ)[0] == 4
    assert resolve_sequence_parallel_size(None, {}) == (1, "default")
    with pytest.raises(ValueError, match="--sequence_parallel_size = 0"):
        resolve_sequence_parallel_size(0, {})


def test_training_arguments_expose_the_flags(tmp_path, monkeypatch):
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(LaspTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sequence_parallel_size", "4", "--sp_mode", "allgather",
         "--offload_activations", "true"])
    assert (parsed.sequence_parallel_size, parsed.sp_mode, parsed.offload_activations) == (4, "allgather", True)
    monkeypatch.setenv("LASP_SEQUENCE_PARALLEL_SIZE", "2")
    assert args(tmp_path).sequence_parallel_size == 2
    with pytest.raises(ValueError, match="--sp_mode 'zigzag'"):
        args(tmp_path, sp_mode="zigzag")


# ---- errors before any step ----------------------------------------------------------------------------

def test_a_model_that_is_not_lasp_is_refused_under_sp(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=64))
    with pytest.raises(ValueError, match="needs a LaspForCausalLM, got GPT2LMHeadModel"):
        LaspTrainer(model=model, args=args(tmp_path, sequence_parallel_size=2), train_dataset=blocks(4, 16))


def test_block_size_not_divisible_by_the_sp_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="blocks of 15 tokens.*divisible by 2"):
        LaspTrainer(model=tiny_model(), args=args(tmp_path, sequence_parallel_size=2), train_dataset=blocks(4, 15))
    with pytest.raises(ValueError, match="eval_dataset has blocks of 10 tokens"):
        LaspTrainer(model=tiny_model(), args=args(tmp_path, sequence_parallel_size=3), train_dataset=blocks(4, 12),
                    eval_dataset=blocks(2, 10))


def test_sp_size_larger_than_the_world_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sequence_parallel_size = 2 .* must divide the number of processes, got 1"):
        LaspTrainer(model=tiny_model(), args=args(tmp_path, sequence_parallel_size=2), train_dataset=blocks(4, 16))


def test_train_clm_refuses_a_block_size_the_sp_size_does_not_divide():
    spec = importlib.util.spec_from_file_location("train_clm_for_test", REPO / "recipes" / "train_clm.py")
    train_clm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_clm)
    with pytest.raises(ValueError, match="--block_size=63 is not divisible by the sequence-parallel size 2"):
        train_clm.parse_args(["--output_dir", "unused", "--block_size", "63", "--sequence_parallel_size", "2"])


# ---- one process: the trainer's own pieces -------------------------------------------------------------

def test_eval_loss_is_token_weighted_over_all_blocks(tmp_path):
    """Blocks with different numbers of targets: the mean over tokens, not the mean of block means."""
    model = tiny_model().eval()
    data = blocks(5, 16)
    labels = [list(row) for row in data["labels"]]
    for i in range(5):  # block i keeps 15 - 2 i targets
        labels[i][1:1 + 2 * i] = [-100] * (2 * i)
    data = data.remove_columns("labels").add_column("labels", labels)
    trainer = LaspTrainer(model=model, args=args(tmp_path, per_device_eval_batch_size=2),
                          data_collator=PackedBlockCollator(), eval_dataset=data)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in data:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(row["labels"][1:])
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    metrics = trainer.evaluate()
    assert abs(metrics["eval_loss"] - total / count) <= 1e-5 * total / count
    assert metrics["eval_samples_per_second"] > 0


def test_one_process_with_several_gpus_trains_on_one_instead_of_data_parallel(tmp_path):
    """nn.DataParallel logged twice the true loss on 2 H100s (packed rows are not split): never wrap in it."""
    training_args = args(tmp_path)
    _ = training_args.device
    training_args._n_gpu = 2  # what TrainingArguments sets on a 2-GPU machine without a launcher
    LaspTrainer(model=tiny_model(), args=training_args, data_collator=PackedBlockCollator(), train_dataset=blocks(2, 8))
    assert training_args.n_gpu == 1


def test_with_shift_labels_masks_document_ends():
    batch = {"input_ids": torch.arange(6)[None], "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]]),
             "labels": torch.tensor([[-100, 11, 12, -100, 14, 15]])}
    out = with_shift_labels(batch)
    assert "labels" not in out
    assert out["shift_labels"].tolist() == [[11, 12, -100, 14, 15, -100]]


def test_scale_loss():
    loss = scale_loss(torch.tensor(6.0), torch.tensor(3), 4)
    assert loss.item() == 8.0
    assert scale_loss(torch.tensor(0.0), torch.tensor(0), 2).item() == 0.0


# ---- recipes/max_seq_len.py ------------------------------------------------------------------------------

def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}_for_test", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("limit", [1, 63, 64, 100, 1000, 5000, 10**6])
def test_max_seq_len_search_finds_the_largest_fitting_multiple(limit):
    find_longest = _recipe("max_seq_len").find_longest
    tried = []

    def fits(T):
        tried.append(T)
        return T <= limit

    cap, granularity = 8192, 64
    expected = None if limit < 64 else min(limit // granularity * granularity, cap)
    assert find_longest(fits, 64, cap, granularity) == expected
    assert all(T % granularity == 0 and T <= cap for T in tried)
    assert len(tried) <= 2 * 8  # doubling then bisecting: logarithmic


def test_max_seq_len_runs_on_the_cpu_with_a_cap(tmp_path):
    result_file = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "max_seq_len.py"), "--start", "64", "--max_block_size", "256",
         "--granularity", "64", "--offload_activations", "--json", str(result_file)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("longest trainable block_size for tnl-tiny.json")
    import json

    record = json.loads(result_file.read_text())
    assert record["longest_block_size"] == 256 and record["capped"]
    assert [trial["block_size"] for trial in record["trials"]] == [64, 128, 256]
