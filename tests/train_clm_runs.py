"""Launch `recipes/train_clm.py` (or another recipe) from tests and read what it logged.

    from train_clm_runs import launch_train_clm, per_step, assert_match
    launch_train_clm(out, "--max_steps", "4", config_file=REPO / "recipes/accelerate/cpu_sp2.yaml")
    assert_match(per_step(out, "loss"), per_step(reference_dir, "loss"), range(1, 5), "loss", rtol=1e-4)

Shared by tests/test_train_sp.py and tests/test_train_deepspeed.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import uuid

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_CLM = REPO / "recipes" / "train_clm.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment carries `marker` (launchers start workers in sessions of their own,
    and a worker whose launcher died is no longer in the launcher's process group)."""
    needle = marker.encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def run_in_own_group(command, env, timeout):
    """subprocess.run, but a timeout kills the launcher's whole process group and every worker it started (found by
    a marker in their environment), not only itself, and a worker that outlives its launcher cannot stall the test."""
    marker = f"LASP_TEST_RUN={uuid.uuid4().hex}"
    env = {**env, "LASP_TEST_RUN": marker.split("=", 1)[1]}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_marked(marker)
        stdout, stderr = process.communicate(timeout=60)
        raise AssertionError(f"{command} did not finish in {timeout} s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def launch_train_clm(output_dir, *args, config_file=None, num_processes=None, expect_ok=True, extra_env=None,
                     timeout=300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <config_file> [--num_processes N] train_clm.py --output_dir <dir> <args>`,
    or plain `python train_clm.py ...` (one process) when config_file is None."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           **(extra_env or {})}
    env.pop("LASP_SEQUENCE_PARALLEL_SIZE", None)
    if config_file is None:
        command = [sys.executable, str(TRAIN_CLM)]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                   "--main_process_port", str(free_port())]
        if num_processes is not None:
            command += ["--num_processes", str(num_processes)]
        command += [str(TRAIN_CLM)]
    command += ["--output_dir", str(output_dir), *args]
    result = run_in_own_group(command, env, timeout)
    if expect_ok:
        assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def history(output_dir):
    return json.loads((pathlib.Path(output_dir) / "trainer_state.json").read_text())["log_history"]


def per_step(output_dir, key):
    """{step: value} of every log entry that has `key` (e.g. "loss", "grad_norm")."""
    return {entry["step"]: entry[key] for entry in history(output_dir) if key in entry}


def assert_match(values, reference, steps, what, rtol):
    assert sorted(values) == list(steps), f"logged {what} at steps {sorted(values)}, expected {list(steps)}"
    for step in steps:
        err = abs(values[step] - reference[step]) / abs(reference[step])
        assert err <= rtol, f"step {step}: {what} {values[step]} vs unsharded {reference[step]} (rel. error {err:.2e})"


def saved_model_eval_loss(model_dir, block_size: int, max_train_samples: int = 64) -> float:
    """The reference eval loss of a saved model: each eval block of the shipped corpus (as train_clm.py splits it)
    alone through the model, cross-entropy summed in float64 over the tokens that have a label."""
    import torch
    import torch.nn.functional as F
    from lasp_hf import LaspForCausalLM
    from lasp_hf.training import build_clm_datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer")
    _, evaluation = build_clm_datasets(tokenizer, block_size, train_file=str(REPO / "data" / "corpus.jsonl"),
                                       eval_fraction=0.02, max_train_samples=max_train_samples)
    model = LaspForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for block in evaluation:
            ids = torch.tensor([block["input_ids"]])
            labels = torch.tensor(block["labels"])
            logits = model(input_ids=ids, position_ids=torch.tensor([block["position_ids"]])).logits[0].double()
            targets = labels[1:]  # token t predicts labels[t + 1]; -100 at every document start
            keep = targets != -100
            total += F.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count
