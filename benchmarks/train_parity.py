"""Loss parity of `recipes/train_clm.py` with sequence parallelism on and off.

Runs the same training through `accelerate launch` with SP = 1 on one process, then with SP = W on W processes once
per accelerate config (same seed, data and block size), and prints the per-step losses side by side with their
relative difference, tokens/s, TFLOP/s per GPU and peak memory. Writes `train-parity-<card>-W<W>.json` (+ .md).
`--base_world 2` makes the reference an SP = 2 run (for a block too long for one GPU); `--model_name_or_path`
trains on from a saved lasp model (a converted checkpoint) instead of a fresh one from --model_config.

    python benchmarks/train_parity.py --world 4 --model_config recipes/configs/tnl-385m.json --block_size 131072 \
        --steps 20 --bf16 --gradient_checkpointing \
        --accelerate_config recipes/accelerate/ddp_sp4.yaml recipes/accelerate/fsdp2_sp4.yaml
    python benchmarks/train_parity.py --cpu --world 2 --steps 4 --block_size 64      # CPU smoke run (gloo)
    python benchmarks/train_parity.py --world 4 --base_world 2 --model_name_or_path outputs/tnl-1b-lasp \
        --block_size 524288 --steps 20 --bf16 --gradient_checkpointing \
        --accelerate_config recipes/accelerate/fsdp2_sp4.yaml --base_config recipes/accelerate/fsdp2_sp2.yaml
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO_ROOT, RESULTS_DIR, Column, card_slug, environment, format_table,  # noqa: E402
                    launch_training, write_results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="SP size of the second run (processes)")
    parser.add_argument("--model_config", default=str(REPO_ROOT / "recipes/configs/tnl-tiny.json"))
    parser.add_argument("--model_name_or_path", default=None,
                        help="a saved lasp model to train on (replaces --model_config); the tokenizer is the shipped "
                             "one unless the folder holds its own")
    parser.add_argument("--base_world", type=int, default=1, help="SP size of the reference run (default 1)")
    parser.add_argument("--base_config", default=None, help="accelerate config of the reference run")
    parser.add_argument("--train_file", default=None, help="train_clm.py's --train_file (default: the shipped corpus)")
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
    if args.base_world >= args.world:
        raise ValueError(f"--base_world ({args.base_world}) must be below --world ({args.world})")
    extra = ["--train_file", args.train_file] if args.train_file else []
    model_config = args.model_config
    if args.model_name_or_path is not None:
        model_config = None
        extra += ["--model_name_or_path", args.model_name_or_path]
        if not (Path(args.model_name_or_path) / "tokenizer_config.json").exists():
            extra += ["--tokenizer", str(REPO_ROOT / "data/tokenizer")]
    run = dict(model_config=model_config, block_size=args.block_size, steps=args.steps, bf16=args.bf16,
               gradient_checkpointing=args.gradient_checkpointing, cpu=args.cpu, timeout_s=args.timeout_s,
               extra=extra)
    scratch = Path(tempfile.mkdtemp(prefix="train-parity-"))  # checkpoints and saved models stay out of --out
    runs = {}
    try:
        base = launch_training(args.base_world, scratch / "base", config_file=args.base_config, **run)
        for config in args.accelerate_config or [None]:
            name = Path(config).stem if config else f"default_sp{args.world}"
            try:
                runs[name] = launch_training(args.world, scratch / name, config_file=config, **run)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                print(f"{name}: FAILED ({err})", flush=True)
                runs[name] = None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    env, W, B = environment(), args.world, args.base_world
    rows, summary = [], {}
    for name, hist in runs.items():
        if hist is None:
            summary[name] = {"status": "FAILED"}
            continue
        for a, b in zip(base, hist):
            rows.append({"run": name, "step": a["step"], f"loss_sp{B}": a["loss"], f"loss_sp{W}": b["loss"],
                         "rel_diff": abs(a["loss"] - b["loss"]) / abs(a["loss"]),
                         **{f"{key}_sp{sp}": h.get(field) for sp, h in ((B, a), (W, b)) for key, field in
                            (("tok_s", "tokens_per_second"), ("tflops", "tflops_per_device"),
                             ("mem_gb", "peak_memory_gb"))}})
        diffs = [r["rel_diff"] for r in rows if r["run"] == name]
        summary[name] = {"status": "ok", "steps": len(diffs), "max_rel_diff": max(diffs, default=None)}
    columns = [Column("run", "run"), Column("step", "step"), Column(f"loss_sp{B}", f"loss SP={B}", "{:.5f}"),
               Column(f"loss_sp{W}", f"loss SP={W}", "{:.5f}"), Column("rel_diff", "rel diff", "{:.1e}")]
    columns += [Column(f"{key}_sp{sp}", f"{header} SP={sp}", fmt) for key, header, fmt in
                (("tok_s", "tok/s", "{:.0f}"), ("tflops", "TFLOP/s/GPU", "{:.1f}"), ("mem_gb", "peak GB", "{:.1f}"))
                for sp in (B, W)]
    path = write_results(f"train-parity-{card_slug(env['card'])}-W{W}", env, rows, columns, args.out,
                         extra={"args": vars(args), "runs": summary},
                         notes=[f"command: `{' '.join(sys.argv)}`"] + [f"{n}: {i}" for n, i in summary.items()])
    print(format_table(rows, columns) + "\n" + "\n".join(f"{n}: {i}" for n, i in summary.items()) + f"\nwrote {path}")
    sys.exit(1 if any(info["status"] != "ok" for info in summary.values()) else 0)


if __name__ == "__main__":
    main()
