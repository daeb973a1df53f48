"""Loss parity and throughput of `recipes/train_clm.py` with sequence parallelism on and off.

Runs the same training twice through `accelerate launch` (SP = 1 on one process, then SP = W on W
processes, same seed, same data, same block size), reads both `trainer_state.json` log histories and
prints the per-step losses side by side with their relative difference, tokens/s and peak memory.
Writes `train-parity-<card>-W<W>.json` (+ .md) under --out.

    python benchmarks/train_parity.py --world 2 --model_config recipes/configs/tnl-385m.json \
        --block_size 16384 --steps 20 --bf16          # on a machine with >= 2 GPUs
    python benchmarks/train_parity.py --cpu --world 2 --steps 4 --block_size 64   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import card_slug, environment  # noqa: E402


def launch(world: int, args, out_dir: Path) -> dict:
    """One training run; returns its log history."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(world),
           "--num_machines", "1", "--mixed_precision", "bf16" if args.bf16 else "no", "--dynamo_backend", "no"]
    if args.cpu and world > 1:
        cmd += ["--config_file", str(REPO / "recipes/accelerate/cpu_sp2.yaml")]
    elif args.cpu:
        cmd.append("--cpu")
    elif world > 1:
        cmd.append("--multi_gpu")
    cmd += [str(REPO / "recipes/train_clm.py"), "--model_config", args.model_config,
            "--block_size", str(args.block_size), "--max_steps", str(args.steps), "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--learning_rate", "3e-4", "--warmup_steps", "2",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--data_seed", "0", "--sequence_parallel_size", str(world), "--output_dir", str(out_dir),
            "--dataloader_num_workers", "0"]
    if args.bf16:
        cmd.append("--bf16")
    if args.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "HF_HUB_OFFLINE": "1"}
    if not args.cpu:
        # SP = 1 on exactly one GPU (a single process seeing several would otherwise be a DataParallel run).
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(world))
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, timeout=args.timeout_s)
    state = json.loads((out_dir / "trainer_state.json").read_text())
    return [row for row in state["log_history"] if "loss" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="SP size of the second run (processes)")
    parser.add_argument("--model_config", default=str(REPO / "recipes/configs/tnl-tiny.json"))
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--timeout-s", dest="timeout_s", type=int, default=900)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The runs' checkpoints and saved models stay out of --out (the GPU machine returns at most 8 files).
    scratch = Path(tempfile.mkdtemp(prefix="train-parity-"))
    try:
        runs = {w: launch(w, args, scratch / f"run-sp{w}") for w in (1, args.world)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base, sp = runs[1], runs[args.world]
    rows = []
    for a, b in zip(base, sp):
        rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
        rows.append({"step": a["step"], "loss_sp1": a["loss"], f"loss_sp{args.world}": b["loss"], "rel_diff": rel,
                     "tok_s_sp1": a.get("tokens_per_second"), f"tok_s_sp{args.world}": b.get("tokens_per_second"),
                     "mem_gb_sp1": a.get("peak_memory_gb"), f"mem_gb_sp{args.world}": b.get("peak_memory_gb")})
    env = environment()
    result = {"env": env, "args": vars(args), "rows": rows, "max_rel_diff": max(r["rel_diff"] for r in rows)}
    card = "cpu" if args.cpu else card_slug(env.get("card", "gpu"))
    path = out / f"train-parity-{card}-W{args.world}.json"
    path.write_text(json.dumps(result, indent=1))
    header = f"| step | loss SP=1 | loss SP={args.world} | rel diff | tok/s SP=1 | tok/s SP={args.world} (total) | " \
             f"peak GB SP=1 | peak GB SP={args.world} |"
    lines = [f"# train parity, {env.get('card')}, W={args.world}", "", f"`{' '.join(sys.argv)}`", "", header,
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| {} | {:.5f} | {:.5f} | {:.2e} | {} | {} | {} | {} |".format(
            r["step"], r["loss_sp1"], r[f"loss_sp{args.world}"], r["rel_diff"], r["tok_s_sp1"],
            r[f"tok_s_sp{args.world}"], r["mem_gb_sp1"], r[f"mem_gb_sp{args.world}"]))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"max relative loss difference over {len(rows)} steps: {result['max_rel_diff']:.2e}; wrote {path}")


if __name__ == "__main__":
    main()
