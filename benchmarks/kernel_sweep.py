"""Sweep the Triton op's launch knobs (state tile / warps / stages per phase, programs per SM) on one GPU.

For each shape, times the forward for every forward config x programs-per-SM, then forward+backward for
every backward config with the best forward config; prints a table and writes `kernel-sweep-<card>.json`
(+ .md) under --out. The knobs are `lasp_hf.kernels.triton.chunk.CONFIGS` / `PROGRAMS_PER_SM`: a config is
(largest float32 state tile a program holds, num_warps, num_stages), so 16384 at K = V = 128 means one
program holds the whole 128 x 128 state (one V block: q and k are read once per chunk).

    python benchmarks/kernel_sweep.py --shapes 1x32768x16 1x131072x16 8x16384x32
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import card_slug, environment  # noqa: E402

import lasp_hf  # noqa: E402
from lasp_hf.kernels.triton import chunk  # noqa: E402

FWD_CONFIGS = [(8192, 4, 2), (16384, 8, 2), (16384, 8, 3), (16384, 8, 1), (8192, 8, 2)]
BWD_CONFIGS = [(8192, 4, 2), (16384, 8, 2), (8192, 8, 2), (4096, 4, 2)]
PPS = (1, 2, 4, 8)


def parse_shape(text: str) -> tuple[int, int, int]:
    B, T, H = (int(x) for x in text.lower().split("x"))
    return B, T, H


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1x32768x16", "1x131072x16", "8x16384x32"],
                        help="BxTxH shapes (K = V = --dim, bf16, g per head)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args()
    dev = torch.device("cuda")
    env = environment(dev)
    base_cfg, base_pps = dict(chunk.CONFIGS), chunk.PROGRAMS_PER_SM
    rows = []

    def apply(fwd, bwd, pps):
        chunk.CONFIGS.update(fwd=fwd, bwd=bwd)
        chunk.PROGRAMS_PER_SM = pps
        chunk._dense_plan.cache_clear()

    def timed(fn, **kw):
        try:
            return do_bench(fn, return_mode="median", **kw)
        except Exception as err:  # noqa: BLE001 - a config may not fit the card (shared memory, registers)
            print("  failed:", repr(err)[:200], flush=True)
            return float("nan")

    for shape in args.shapes:
        B, T, H = parse_shape(shape)
        D = args.dim
        q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        g = -(2.0 ** (-8.0 * torch.arange(1, H + 1, device=dev, dtype=torch.float32) / H))
        do = torch.randn_like(v)

        def fwd(q=q, k=k, v=v, g=g):
            with torch.no_grad():
                lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend="triton")

        def fwd_bwd(q=q, k=k, v=v, g=g, do=do):
            lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend="triton")[0].backward(do)

        best = None
        for fc, pps in itertools.product(FWD_CONFIGS, PPS):
            apply(fc, base_cfg["bwd"], pps)
            ms = timed(fwd, warmup=50, rep=200)
            rows.append({"B": B, "T": T, "H": H, "phase": "fwd", "fwd_cfg": fc, "bwd_cfg": None, "pps": pps, "ms": ms})
            print(f"B{B} T{T} H{H} fwd {fc} pps {pps}: {ms:.3f} ms", flush=True)
            if not math.isnan(ms) and (best is None or ms < best[0]):
                best = (ms, fc, pps)
        for bc, pps in itertools.product(BWD_CONFIGS, PPS):
            apply(best[1], bc, pps)
            ms = timed(fwd_bwd, warmup=50, rep=300, grad_to_none=[q, k, v])
            rows.append({"B": B, "T": T, "H": H, "phase": "fwd+bwd", "fwd_cfg": best[1], "bwd_cfg": bc, "pps": pps,
                         "ms": ms})
            print(f"B{B} T{T} H{H} fwd+bwd fwd {best[1]} bwd {bc} pps {pps}: {ms:.3f} ms", flush=True)
        del q, k, v, do, fwd, fwd_bwd
        torch.cuda.empty_cache()
    apply(base_cfg["fwd"], base_cfg["bwd"], base_pps)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernel-sweep-{card_slug(env.get('card', 'gpu'))}.json"
    path.write_text(json.dumps({"env": env, "base": {"configs": base_cfg, "pps": base_pps}, "rows": rows}, indent=1))
    lines = [f"# kernel launch sweep, {env.get('card')}", "", "| B | T | H | phase | fwd cfg | bwd cfg | pps | ms |",
             "|---" * 8 + "|"]
    for (B, T, H, phase), group in itertools.groupby(rows, key=lambda r: (r["B"], r["T"], r["H"], r["phase"])):
        group = sorted(group, key=lambda r: (math.isnan(r["ms"]), r["ms"]))
        for r in group[:4]:  # the four fastest of each (shape, phase)
            lines.append(f"| {B} | {T} | {H} | {phase} | {r['fwd_cfg']} | {r['bwd_cfg']} | {r['pps']} | {r['ms']:.3f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
