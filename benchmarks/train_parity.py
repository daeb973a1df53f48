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
from common import NO_MULTICAST_ENV, card_slug, environment  # noqa: E402


def launch(world: int, args, out_dir: Path, config_file: str | None = None, extra: list[str] | None = None) -> dict:
    """One training run (with `config_file` for accelerate launch, if given, and `extra` arguments for
    train_clm.py); returns its log history."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(world),
           "--num_machines", "1", "--mixed_precision", "bf16" if args.bf16 else "no", "--dynamo_backend", "no"]
    if config_file:
        cmd += ["--config_file", config_file]
    elif args.cpu and world > 1:
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
    if args.cpu:
        cmd.append("--use_cpu")  # TrainingArguments refuses --bf16 without a GPU unless told it is meant for the CPU
    if args.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    cmd += extra or []
    env = {**os.environ, **NO_MULTICAST_ENV, "HF_HUB_OFFLINE": "1"}
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
    parser.add_argument("--accelerate_config", nargs="*", default=[],
                        help="accelerate config files for the SP=W run(s), e.g. recipes/accelerate/ddp_sp4.yaml "
                             "recipes/accelerate/fsdp2_sp4.yaml: one SP run each, all against the same SP=1 run "
                             "(default: one run with `--multi_gpu`, or cpu_sp2.yaml with --cpu)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The runs' checkpoints and saved models stay out of --out (the GPU machine returns at most 8 files).
    scratch = Path(tempfile.mkdtemp(prefix="train-parity-"))
    configs = args.accelerate_config or [None]
    try:
        base = launch(1, args, scratch / "run-sp1")
        runs = {}
        for config in configs:
            name = Path(config).stem if config else f"default_sp{args.world}"
            try:
                runs[name] = launch(args.world, args, scratch / f"run-{name}", config)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                print(f"{name}: FAILED ({err})", flush=True)
                runs[name] = None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    env = environment()
    W = args.world
    rows, summary = [], {}
    for name, hist in runs.items():
        if hist is None:
            summary[name] = {"status": "FAILED"}
            continue
        diffs = []
        for a, b in zip(base, hist):
            rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
            diffs.append(rel)
            rows.append({"run": name, "step": a["step"], "loss_sp1": a["loss"], f"loss_sp{W}": b["loss"],
                         "rel_diff": rel, "tok_s_sp1": a.get("tokens_per_second"),
                         f"tok_s_sp{W}": b.get("tokens_per_second"), "tflops_sp1": a.get("tflops_per_device"),
                         f"tflops_sp{W}": b.get("tflops_per_device"), "mem_gb_sp1": a.get("peak_memory_gb"),
                         f"mem_gb_sp{W}": b.get("peak_memory_gb")})
        summary[name] = {"status": "ok", "steps": len(diffs), "max_rel_diff": max(diffs) if diffs else None}
    result = {"env": env, "args": vars(args), "runs": summary, "rows": rows}
    card = "cpu" if args.cpu else card_slug(env.get("card", "gpu"))
    path = out / f"train-parity-{card}-W{W}.json"
    path.write_text(json.dumps(result, indent=1))
    header = (f"| run | step | loss SP=1 | loss SP={W} | rel diff | tok/s SP=1 | tok/s SP={W} (total) | "
              f"TFLOP/s/GPU SP=1 | TFLOP/s/GPU SP={W} | peak GB SP=1 | peak GB SP={W} |")
    lines = [f"# train parity, {env.get('card')}, W={W}", "", f"`{' '.join(sys.argv)}`", "", header,
             "|---" * 11 + "|"]
    for r in rows:
        lines.append("| {} | {} | {:.5f} | {:.5f} | {:.2e} | {} | {} | {} | {} | {} | {} |".format(
            r["run"], r["step"], r["loss_sp1"], r[f"loss_sp{W}"], r["rel_diff"], r["tok_s_sp1"], r[f"tok_s_sp{W}"],
            r["tflops_sp1"], r[f"tflops_sp{W}"], r["mem_gb_sp1"], r[f"mem_gb_sp{W}"]))
    lines.append("")
    for name, info in summary.items():
        lines.append(f"- {name}: {info}")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    if any(info["status"] != "ok" for info in summary.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
