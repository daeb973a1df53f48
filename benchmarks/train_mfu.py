"""Training throughput and MFU of `recipes/train_clm.py`, with or without sequence parallelism.

One `accelerate launch` run per (accelerate config, gradient checkpointing on/off, tokens per GPU), each training
--steps steps on one sequence of `tokens per GPU x W` tokens per step. The steady-state rate is the median of the
logged tokens/s after --skip steps (the first steps compile kernels and warm the allocator; the median also stands
a one-off stall); the mean is kept too. MFU = 6 x parameters x tokens/s per GPU / the card's dense bf16 peak
(H100 / H200 SXM: 989.4 TFLOP/s); recomputation under checkpointing is not useful work. --profile_steps A B: the
first run also writes torch.profiler tables (`train-mfu-<card>-profile.txt`). Without --accelerate_config, W = 1 is
a plain launch and W > 1 takes `recipes/accelerate/ddp_sp<W>.yaml`. Writes `train-mfu-<card>-W<W>.json` (+ .md).

    python benchmarks/train_mfu.py --world 1 --tokens_per_gpu 32768 131072 524288 --steps 8 --skip 3 \
        --extra --model_dtype bfloat16                                                # one GPU
    python benchmarks/train_mfu.py --world 4 --accelerate_config recipes/accelerate/fsdp2_sp4.yaml \
        --checkpointing off on --profile_steps 8 9                                   # SP = 4
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO_ROOT, RESULTS_DIR, Column, card_slug, environment, format_table,  # noqa: E402
                    launch_training, write_results)

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16 tensor-core peaks


def card_peak(card: str) -> float | None:
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in card.upper()), None)


def steady_row(hist: list[dict], skip: int, world: int, peak: float | None) -> dict:
    """The steady-state numbers of one run's logged steps (after the first `skip`)."""
    steady = [h for h in hist if h.get("tokens_per_second")][skip:]
    if not steady:
        return {"status": "FAILED", "note": f"no logged tokens/s after the first {skip} steps"}
    rates = [h["tokens_per_second"] for h in steady]
    tflops = statistics.median(h["tflops_per_device"] for h in steady)
    return {"status": "ok", "steps_averaged": len(steady), "tokens_per_second": statistics.median(rates),
            "tokens_per_second_mean": statistics.fmean(rates), "tokens_per_second_per_step": rates,
            "tokens_per_second_per_gpu": statistics.median(rates) / world, "tflops_per_gpu": tflops,
            "mfu": tflops / peak if peak else None,
            "peak_memory_gb": max(h.get("peak_memory_gb", 0.0) for h in hist), "final_loss": hist[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4, help="processes (= SP size) per run")
    parser.add_argument("--model_config", default=str(REPO_ROOT / "recipes/configs/tnl-1b.json"))
    parser.add_argument("--tokens_per_gpu", type=int, nargs="+", default=[32768])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=4, help="first logged steps left out of the median")
    parser.add_argument("--accelerate_config", nargs="+", default=None,
                        help="config files, one run each (default: none at W = 1, ddp_sp<W>.yaml above)")
    parser.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on"])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further train_clm.py arguments for every run (must come last)")
    parser.add_argument("--profile_steps", type=int, nargs=2, default=None)
    parser.add_argument("--cpu", action="store_true", help="CPU processes (smoke test)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="override the card's bf16 peak")
    parser.add_argument("--timeout-s", dest="timeout_s", type=int, default=600)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    if args.steps <= args.skip:
        raise ValueError(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    if args.accelerate_config is None:
        default = REPO_ROOT / f"recipes/accelerate/ddp_sp{args.world}.yaml"
        if args.world > 1 and not default.exists():
            raise ValueError(f"no default accelerate config for --world {args.world} ({default} does not exist); "
                             "pass --accelerate_config")
        args.accelerate_config = [str(default)] if args.world > 1 else [None]

    env = environment()
    peak = args.peak_tflops or card_peak(env["card"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # (the profile is copied there before the results are written)
    scratch = Path(tempfile.mkdtemp(prefix="train-mfu-"))
    rows = []
    try:
        runs = itertools.product(args.accelerate_config, args.checkpointing, args.tokens_per_gpu)
        for i, (config, ckpt, tokens) in enumerate(runs):
            name = f"{Path(config).stem if config else 'single'}-ckpt-{ckpt}"
            name += f"-T{tokens}" if len(args.tokens_per_gpu) > 1 else ""
            profile = ["--profile_steps", *map(str, args.profile_steps)] if i == 0 and args.profile_steps else []
            row = {"run": name, "config": Path(config).name if config else None, "checkpointing": ckpt,
                   "world": args.world, "tokens_per_gpu": tokens}
            try:
                hist = launch_training(args.world, scratch / name, model_config=args.model_config,
                                       block_size=tokens * args.world, steps=args.steps, bf16=True,
                                       gradient_checkpointing=ckpt == "on", cpu=args.cpu, timeout_s=args.timeout_s,
                                       config_file=config, extra=args.extra + profile)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                rows.append({**row, "status": "FAILED", "note": str(err)[:200]})
                continue
            for prof in (scratch / name).glob("profile-steps-*.txt") if profile else ():
                shutil.copy(prof, out / f"train-mfu-{card_slug(env['card'])}-profile.txt")
            rows.append({**row, **steady_row(hist, args.skip, args.world, peak)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    columns = [Column("run", "run"), Column("tokens_per_second", "tok/s total", "{:.0f}"),
               Column("tokens_per_second_per_gpu", "tok/s/GPU", "{:.0f}"),
               Column("tflops_per_gpu", "TFLOP/s/GPU", "{:.1f}"),
               Column("mfu", "MFU", "{:.1%}"), Column("peak_memory_gb", "peak GB", "{:.1f}"),
               Column("final_loss", "final loss", "{:.3f}"), Column("status", "status")]
    path = write_results(f"train-mfu-{card_slug(env['card'])}-W{args.world}", env, rows, columns, out,
                         extra={"args": vars(args), "peak_tflops": peak},
                         notes=[f"command: `{' '.join(sys.argv)}`",
                                f"model {args.model_config}; MFU against a bf16 peak of {peak} TFLOP/s per GPU"])
    print(format_table(rows, columns) + f"\nwrote {path}")
    sys.exit(1 if any(r["status"] != "ok" for r in rows) else 0)


if __name__ == "__main__":
    main()
