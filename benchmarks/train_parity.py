"""Loss parity of `recipes/train_clm.py` with sequence parallelism on and off.

Runs the same training through `accelerate launch` with SP = 1 on one process, then with SP = W on W processes once
per accelerate config (same seed, data and block size), and prints the per-step losses side by side with their
relative difference, tokens/s, TFLOP/s per GPU and peak memory. Writes `train-parity-<card>-W<W>.json` (+ .md).

    python benchmarks/train_parity.py --world 4 --model_config recipes/configs/tnl-385m.json --block_size 131072 \
        --steps 20 --bf16 --gradient_checkpointing \
        --accelerate_config recipes/accelerate/ddp_sp4.yaml recipes/accelerate/fsdp2_sp4.yaml
    python benchmarks/train_parity.py --cpu --world 2 --steps 4 --block_size 64      # CPU smoke run (gloo)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, card_slug, environment, launch_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="SP size of the second run (processes)")
    parser.add_argument("--model_config", default=str(REPO_ROOT / "recipes/configs/tnl-tiny.json"))
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--timeout-s", dest="timeout_s", type=int, default=900)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--accelerate_config", nargs="*", default=[],
                        help="config files of the SP = W runs, one run each, all against the same SP = 1 run "
                             "(default: one run with --multi_gpu, or cpu_sp2.yaml with --cpu)")
    args = parser.parse_args()
    run = dict(model_config=args.model_config, block_size=args.block_size, steps=args.steps, bf16=args.bf16,
               gradient_checkpointing=args.gradient_checkpointing, cpu=args.cpu, timeout_s=args.timeout_s)
    scratch = Path(tempfile.mkdtemp(prefix="train-parity-"))  # checkpoints and saved models stay out of --out
    runs = {}
    try:
        base = launch_training(1, scratch / "sp1", **run)
        for config in args.accelerate_config or [None]:
            name = Path(config).stem if config else f"default_sp{args.world}"
            try:
                runs[name] = launch_training(args.world, scratch / name, config_file=config, **run)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                print(f"{name}: FAILED ({err})", flush=True)
                runs[name] = None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    env, W = environment(), args.world
    rows, summary = [], {}
    for name, hist in runs.items():
        if hist is None:
            summary[name] = {"status": "FAILED"}
            continue
        for a, b in zip(base, hist):
            rows.append({"run": name, "step": a["step"], "loss_sp1": a["loss"], f"loss_sp{W}": b["loss"],
                         "rel_diff": abs(a["loss"] - b["loss"]) / abs(a["loss"]),
                         **{f"{key}_sp{sp}": h.get(field) for sp, h in ((1, a), (W, b)) for key, field in
                            (("tok_s", "tokens_per_second"), ("tflops", "tflops_per_device"),
                             ("mem_gb", "peak_memory_gb"))}})
        diffs = [r["rel_diff"] for r in rows if r["run"] == name]
        summary[name] = {"status": "ok", "steps": len(diffs), "max_rel_diff": max(diffs, default=None)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train-parity-{card_slug(env['card'])}-W{W}.json"
    path.write_text(json.dumps({"env": env, "args": vars(args), "runs": summary, "rows": rows}, indent=1))
    keys = ["run", "step", "loss_sp1", f"loss_sp{W}", "rel_diff", "tok_s_sp1", f"tok_s_sp{W}", "tflops_sp1",
            f"tflops_sp{W}", "mem_gb_sp1", f"mem_gb_sp{W}"]
    fmt = lambda v: f"{v:.5g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# train parity, {env['card']}, W={W}, commit {env['commit'][:12]}, {env['date_utc'][:10]}", "",
             f"`{' '.join(sys.argv)}`", "", "| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    lines += [""] + [f"- {name}: {info}" for name, info in summary.items()]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nwrote {path}")
    sys.exit(1 if any(info["status"] != "ok" for info in summary.values()) else 0)


if __name__ == "__main__":
    main()
