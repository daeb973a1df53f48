"""Training throughput and MFU of `recipes/train_clm.py` under sequence parallelism.

One `accelerate launch` run per (accelerate config, gradient checkpointing on/off, tokens per GPU), each training a
fixed number of steps on one sequence of `tokens per GPU x W` tokens per step; the steady-state rate is the median
of the logged tokens/s after `--skip` steps (the first steps compile kernels and warm the allocator; the median
also stands a one-off stall, such as a profiled step or a late kernel compilation; the mean is kept as well).
MFU = 6 x parameters x tokens/s per GPU / the card's dense bf16 peak (H100 / H200 SXM: 989.4 TFLOP/s);
recomputation under checkpointing does not count as useful work. With --profile_steps A B the first run
also writes torch.profiler tables (kept as `train-mfu-<card>-profile.txt`).
Writes `train-mfu-<card>-W<W>.json` (+ .md) under --out. Without --accelerate_config, W = 1 is a plain one-process
launch and W > 1 takes `recipes/accelerate/ddp_sp<W>.yaml`.

    python benchmarks/train_mfu.py --world 4 --model_config recipes/configs/tnl-1b.json \
        --accelerate_config recipes/accelerate/ddp_sp4.yaml recipes/accelerate/fsdp2_sp4.yaml \
        --checkpointing on off --profile_steps 8 9
    python benchmarks/train_mfu.py --world 1 --tokens_per_gpu 32768 131072 524288 --steps 8 --skip 3   # one GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import card_slug, environment  # noqa: E402
from train_parity import launch  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) of the cards this project is measured on.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def card_peak(card: str) -> float | None:
    for name, peak in PEAK_TFLOPS.items():
        if name in card.upper():
            return peak
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4, help="processes (= SP size) per run")
    parser.add_argument("--model_config", default=str(REPO / "recipes/configs/tnl-1b.json"))
    parser.add_argument("--tokens_per_gpu", type=int, nargs="+", default=[32768])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=4, help="first logged steps left out of the median")
    parser.add_argument("--accelerate_config", nargs="+", default=None,
                        help="config files, one run each (default: none at W = 1, ddp_sp<W>.yaml above)")
    parser.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on"])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further train_clm.py arguments for every run (must come last)")
    parser.add_argument("--profile_steps", type=int, nargs=2, default=None)
    parser.add_argument("--cpu", action="store_true", help="CPU processes (smoke test; give a CPU accelerate config)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="override the card's bf16 peak")
    parser.add_argument("--timeout-s", dest="timeout_s", type=int, default=600)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args()
    if args.steps <= args.skip:
        raise ValueError(f"--steps ({args.steps}) must exceed --skip ({args.skip})")

    if args.accelerate_config is None:
        default = REPO / f"recipes/accelerate/ddp_sp{args.world}.yaml"
        if args.world > 1 and not default.exists():
            raise ValueError(f"no default accelerate config for --world {args.world} ({default} does not exist); "
                             "pass --accelerate_config")
        args.accelerate_config = [str(default)] if args.world > 1 else [None]
    env = environment()
    card = env.get("card", "gpu")
    peak = args.peak_tflops or card_peak(card)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="train-mfu-"))
    rows = []
    first = True
    try:
        for config, ckpt, tokens in itertools.product(args.accelerate_config, args.checkpointing, args.tokens_per_gpu):
            config_name = Path(config).stem if config else "single"
            name = f"{config_name}-ckpt-{ckpt}" + (f"-T{tokens}" if len(args.tokens_per_gpu) > 1 else "")
            run_args = argparse.Namespace(model_config=args.model_config, block_size=tokens * args.world,
                                          steps=args.steps, bf16=True, gradient_checkpointing=ckpt == "on",
                                          cpu=args.cpu, timeout_s=args.timeout_s)
            extra = list(args.extra)
            if first and args.profile_steps:
                extra += ["--profile_steps", *map(str, args.profile_steps)]
            row = {"run": name, "config": Path(config).name if config else None, "checkpointing": ckpt,
                   "world": args.world, "tokens_per_gpu": tokens}
            try:
                hist = launch(args.world, run_args, scratch / name, config, extra)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                print(f"{name}: FAILED ({err})", flush=True)
                rows.append({**row, "status": "FAILED"})
                continue
            if first and args.profile_steps:
                for prof in (scratch / name).glob("profile-steps-*.txt"):
                    shutil.copy(prof, out / f"train-mfu-{card_slug(card)}-profile.txt")
            first = False
            steady = [h for h in hist if h.get("tokens_per_second")][args.skip:]
            rates = [h["tokens_per_second"] for h in steady]
            if not rates:
                print(f"{name}: FAILED (no logged tokens/s after the first {args.skip} steps)", flush=True)
                rows.append({**row, "status": "FAILED"})
                continue
            tok_s = statistics.median(rates)
            tflops = statistics.median(h["tflops_per_device"] for h in steady)
            rows.append({**row, "status": "ok", "steps_averaged": len(steady), "tokens_per_second": tok_s,
                         "tokens_per_second_mean": statistics.fmean(rates),
                         "tokens_per_second_per_step": rates,
                         "tokens_per_second_per_gpu": tok_s / args.world, "tflops_per_gpu": tflops,
                         "mfu": tflops / peak if peak else None,
                         "peak_memory_gb": max(h.get("peak_memory_gb", 0.0) for h in hist),
                         "final_loss": hist[-1]["loss"]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {"env": env, "args": vars(args), "peak_tflops": peak, "rows": rows}
    path = out / f"train-mfu-{card_slug(card)}-W{args.world}.json"
    path.write_text(json.dumps(result, indent=1))
    title = (f"# training MFU, {card}, W={args.world}, {Path(args.model_config).name}, "
             f"{'/'.join(map(str, args.tokens_per_gpu))} tokens per GPU")
    lines = [title, "", f"`{' '.join(sys.argv)}`", "",
             "| run | tok/s total | tok/s/GPU | TFLOP/s/GPU | MFU | peak GB | final loss |", "|---" * 7 + "|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | FAILED | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"| {r['run']} | {r['tokens_per_second']:.0f} | {r['tokens_per_second_per_gpu']:.0f} | "
                     f"{r['tflops_per_gpu']:.1f} | {mfu} | {r['peak_memory_gb']:.1f} | {r['final_loss']:.3f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
