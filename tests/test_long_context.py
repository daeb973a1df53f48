"""The multi-GPU benchmark programs on CPU: long_context.py (and its Llama + context-parallel peer,
llama_cp_train.py), sp_prefill_speed.py, transnormer_source.py + train_parity.py --model_name_or_path, and the
multi-GPU parts of run_device.sh. Their numbers only mean something on GPUs; here we check the plumbing, the
chunked loss of the Llama peer against HF's own full-logits loss, and what the result files hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO / "recipes"))
import llama_cp_train  # noqa: E402
import long_context  # noqa: E402


def _run(args, timeout=300, **env_extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + os.pathsep
           + os.environ["PATH"], **env_extra}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_lengths_and_failures():
    assert [long_context.parse_length(x) for x in ("64K", "1m", "4M", "130")] == [65536, 2**20, 2**22, 130]
    with pytest.raises(ValueError, match="'64Q'"):
        long_context.parse_length("64Q")
    assert long_context.failure_status("torch.OutOfMemoryError: CUDA out of memory. Tried") == "OOM"
    assert long_context.failure_status("RuntimeError: NCCL error") == "FAILED"
    with pytest.raises(ValueError, match="multiple of 2 x --world"):
        long_context.parse_args(["--world", "4", "--lengths", "100"])
    with pytest.raises(ValueError, match="llama-cp on CPU"):
        long_context.parse_args(["--cpu", "--world", "2", "--systems", "llama-cp", "--lengths", "64"])


def test_one_document_corpus_holds_the_length(tmp_path):
    """One jsonl record (one document: no state resets inside a block) holding more tokens than asked for."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "data/tokenizer"))
    path = long_context.one_document_corpus(tmp_path / "doc.jsonl", 1_000_000)
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert len(tokenizer(json.loads(lines[0])["text"])["input_ids"]) > 1_000_000


def _rows(system, lengths, rates, last_status=None, world=4):
    rows = [{"system": system, "seq_len": T, "length": str(T), "world": world, "tokens_per_gpu": T // world,
             "status": "ok", "tokens_per_second": rate, "peak_memory_gb": T / 2**16} for T, rate in zip(lengths, rates)]
    if last_status:
        rows[-1] = {**rows[-1], "status": last_status, "tokens_per_second": None, "peak_memory_gb": None}
    return rows


def test_merge_only_writes_the_combined_table_and_the_targets(tmp_path):
    """Two result files of separate machine starts join into one: the table, the plot and the ratios the targets
    name, from hand-made rows (tnl-1b 800K tok/s at 256K and 2M tokens at most; Llama + CP 100K and 512K)."""
    K = 1024
    env = {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11", "cuda": "13.0", "triton": "3.6",
           "transformers": "5.17", "commit": "abc", "python": "3.12", "peers": {}, "date_utc": "2026-12-07T00:00:00Z"}
    files = []
    for name, rows in (("ours", _rows("tnl-1b", [256 * K, 1024 * K, 2048 * K, 4096 * K], [8e5, 7e5, 6e5, 0], "OOM")),
                       ("peer", _rows("llama-cp", [256 * K, 512 * K, 1024 * K], [1e5, 5e4, 0], "OOM"))):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps({"benchmark": name, "env": env, "rows": rows}))
    out = tmp_path / "out"
    assert long_context.main(["--systems", "--merge", *map(str, files), "--world", "4", "--out", str(out)]) == 0
    data = json.loads((out / "long-context-h100-80gb-hbm3-W4.json").read_text())
    assert [(r["system"], r["seq_len"]) for r in data["rows"]][:2] == [("tnl-1b", 256 * K), ("tnl-1b", 1024 * K)]
    assert data["longest"] == {"tnl-1b": {"longest": 2048 * K, "stopped_by": "OOM"},
                               "llama-cp": {"longest": 512 * K, "stopped_by": "OOM"}}
    md = (out / "long-context-h100-80gb-hbm3-W4.md").read_text()
    assert "256K: tnl-1b 800,000 tok/s vs llama-cp 100,000: 8.0x (target >= 8x)" in md
    assert "longest: tnl-1b / llama-cp = 4.0x (target >= 4x)" in md
    assert (out / "long-context-h100-80gb-hbm3-W4.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at another W"):
        long_context.main(["--systems", "--merge", str(files[0]), "--world", "2", "--out", str(out)])


def test_llama_chunked_loss_equals_hf_full_logits_loss():
    """ChunkedLossLlama (chunks of 7 tokens, float64) against the cross-entropy of the full float64 logits of the
    same model (HF's own loss upcasts to float32 only): the mean loss and every parameter's gradient, relative error
    <= 1e-10 (float64; only the summation order differs)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(llama_cp_train.llama_config(tiny=True, seq_len=40)).double()
    ids, positions, shift = llama_cp_train.step_batch(llm.config.vocab_size, 40, step=3, device="cpu")
    wrapped = llama_cp_train.ChunkedLossLlama(llm, loss_chunk_size=7)
    loss_sum, count = wrapped(ids, positions, shift)
    assert int(count) == 39
    mine = torch.autograd.grad(loss_sum / count, list(llm.parameters()))
    logits = llm(input_ids=ids).logits[0, :-1]  # [T - 1, vocab], float64
    ref = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    theirs = torch.autograd.grad(ref, list(llm.parameters()))
    assert abs(float(loss_sum.detach() / count) - float(ref.detach())) <= 1e-10 * abs(float(ref.detach()))
    for a, b in zip(mine, theirs, strict=True):
        assert float((a - b).norm() / b.norm()) <= 1e-10


def test_llama_cp_train_arguments(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="multiple of 2 x W = 8"):
        llama_cp_train.parse_args(["--seq_len", "100"])
    with pytest.raises(ValueError, match="--cpu runs one process"):
        llama_cp_train.parse_args(["--seq_len", "64", "--cpu"])
    llama_cp_train.main(["--seq_len", "262144", "--tiny", "--dry_run"])  # the plan of a 4-GPU launch
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["cp_size"] == 4 and plan["tokens_per_gpu"] == 65536 and plan["cp_comm_strategy"] == "allgather"


def test_llama_cp_train_one_cpu_process(tmp_path):
    """The training loop without CP (one CPU process): per-step rows, a finite loss near log(vocab) at random
    init, and the file long_context.py reads."""
    out = tmp_path / "llama.json"
    _run([sys.executable, str(BENCH_DIR / "llama_cp_train.py"), "--cpu", "--tiny", "--seq_len", "64", "--steps", "2",
          "--json", str(out)])
    run = json.loads(out.read_text())
    assert [s["step"] for s in run["steps"]] == [1, 2] and run["world"] == 1 and run["cp_size"] == 1
    for step in run["steps"]:
        assert step["tokens_per_second"] > 0 and abs(step["loss"] - torch.log(torch.tensor(128.0)).item()) < 1.0
    assert run["peak_memory_gb"] == max(run["peak_memory_gb_per_rank"]) > 0


def test_step4m_arguments_and_search():
    """run_device.sh step4m's max_seq_len.py flags parse, and its search (4M, then up to 8M at 2M resolution)
    tries 4M, 8M, 6M when 6M is the largest that fits."""
    import max_seq_len

    args = max_seq_len.parse_args(["--model_config", "recipes/configs/tnl-1b.json", "--offload_activations",
                                   "--mlp_chunk_size", "16384", "--attention_chunk_size", "16384", "--start",
                                   "4194304", "--granularity", "2097152", "--max_block_size", "8388608"])
    tried = []

    def fits(T):
        tried.append(T)
        return T <= 6 * 2**20

    assert max_seq_len.find_longest(fits, args.start, args.max_block_size, args.granularity) == 6 * 2**20
    assert tried == [4 * 2**20, 8 * 2**20, 6 * 2**20]


@pytest.mark.distributed
def test_run_device_multi_gpu_parts_on_cpu(tmp_path):
    """run_device.sh long-tnl, finetune, prefill and w8 with CPU stand-ins (MULTI_WORLD=2, gloo, tiny models): every
    part exits 0 (w8 is skipped without 8 GPUs), and the files come back as the README says."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(BENCH_DIR / "run_device.sh"), "long-tnl", "finetune", "prefill", "w8"], capture_output=True,
        text=True, timeout=400, check=False, cwd=REPO,
        env={**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
             "OUT": str(out), "SKIP_INSTALL": "1", "MULTI_WORLD": "2", "OMP_NUM_THREADS": "1",
             "LASP_HF_COMMIT": "abc123", "LONG_ARGS": "--cpu --tiny --lengths 64", "SOURCE_ARGS": "--tiny",
             "FINETUNE_ARGS": "--cpu --block_size 64 --steps 2", "PREFILL_ARGS": "--cpu --tiny"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "long-context-cpu-W2-tiny.json", "long-context-cpu-W2-tiny.png", "run-device.log", "sp-prefill-cpu-W2-tiny.json",
        "summary.md", "train-parity-cpu-W2.json"]
    summary = (out / "summary.md").read_text()
    for status in ("long-tnl-W2: exit 0", "finetune-convert: exit 0", "finetune-W2: exit 0", "prefill-W2: exit 0",
                   "w8: skipped, 0 GPUs"):
        assert status in summary
    long_rows = json.loads((out / "long-context-cpu-W2-tiny.json").read_text())["rows"]
    assert [(r["system"], r["seq_len"], r["status"]) for r in long_rows] == [("tnl-1b", 64, "ok")]
    assert long_rows[0]["tokens_per_second"] > 0 and long_rows[0]["tokens_per_second_per_gpu"] > 0
    # The converted TransNormerLLM layout trains under SP = 2 with the losses of SP = 1 (float32: <= 1e-4).
    parity = json.loads((out / "train-parity-cpu-W2.json").read_text())
    assert parity["runs"]["default_sp2"]["status"] == "ok" and parity["runs"]["default_sp2"]["max_rel_diff"] < 1e-4
    prefill = {r["provider"]: r for r in json.loads((out / "sp-prefill-cpu-W2-tiny.json").read_text())["rows"]}
    assert set(prefill) == {"single", "sp-ring", "sp-allgather"}
    for mode in ("sp-ring", "sp-allgather"):  # SP prefill's logits against the one-process prefill, float32
        assert prefill[mode]["status"] == "ok" and prefill[mode]["err"] <= 1e-4 and prefill[mode]["ttft_ms"] > 0


def test_a_timed_out_launch_leaves_no_workers(tmp_path):
    """common.run_process_group kills the whole process group at the timeout (a launcher's workers would otherwise
    keep their GPUs), and reports a non-zero exit with the output in the log file."""
    import common

    marker = tmp_path / "alive"
    script = f"(sleep 3; touch {marker}) & sleep 30; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        common.run_process_group(["bash", "-c", script], dict(os.environ), 1)
    import time

    time.sleep(3)
    assert not marker.exists()  # the background worker died with its launcher
    log = tmp_path / "log.txt"
    with pytest.raises(subprocess.CalledProcessError):
        common.run_process_group(["bash", "-c", "echo OutOfMemoryError; exit 1"], dict(os.environ), 10, log)
    assert long_context.failure_status(log.read_text()) == "OOM"
