"""Where the op's GPU time goes, kernel by kernel, for a few launch-setting variants (one GPU).

For each shape and variant: the forward and forward+backward times (do_bench medians, as in
`kernel_speed.py`) and, from torch.profiler over a few iterations, each kernel's GPU microseconds per call of the
op; fla's `chunk_simple_gla` the same way when it is installed. A variant is a set of
`lasp_hf.kernels.triton.chunk.CONFIGS` entries ((float32 state tile, num_warps, num_stages) per phase) and
programs per SM. Prints the tables and writes kernel-breakdown-<card>.json (+ .md) under --out.

    python benchmarks/kernel_breakdown.py --shapes 1x32768x16 1x131072x16
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import card_slug, environment  # noqa: E402

import lasp_hf  # noqa: E402
from lasp_hf.kernels.triton import chunk  # noqa: E402

# name -> (CONFIGS overrides, programs per SM or None for the default)
VARIANTS = {
    "default": ({}, None),
    "s5_default": ({"fwd": (16384, 8, 3), "fwd_state": (16384, 8, 3)}, None),
    "out_bt128_3s": ({"fwd": (16384, 8, 3, 128)}, None),
    "out_bt128_4w": ({"fwd": (16384, 4, 2, 128)}, None),
    "state_4w": ({"fwd_state": (8192, 4, 2)}, None),
    "scan_256": ({"scan": (256, 4, 1)}, None),
    "scan_1024": ({"scan": (1024, 4, 1)}, None),
    "pps_2": ({}, 2),
    "pps_3": ({}, 3),
    "pps_6": ({}, 6),
    "out_stages_2": ({"fwd": (16384, 8, 2), "fwd_state": (16384, 8, 3)}, None),
    "out_stages_4": ({"fwd": (16384, 8, 4), "fwd_state": (16384, 8, 3)}, None),
    "state_bt128": ({"fwd_state": (16384, 8, 2, 128), "bwd_state": (8192, 4, 2, 128)}, None),
    "state_bt128_s3": ({"fwd_state": (16384, 8, 3, 128), "bwd_state": (8192, 4, 3, 128)}, None),
    "state_bt128_4w": ({"fwd_state": (16384, 4, 2, 128), "bwd_state": (8192, 4, 2, 128)}, None),
    "out_bt128": ({"fwd": (16384, 8, 2, 128)}, None),
    "bt128_both": ({"fwd": (16384, 8, 2, 128), "fwd_state": (16384, 8, 2, 128), "bwd_state": (8192, 4, 2, 128)},
                   None),
}


def kernel_times(fn, iters: int = 10) -> dict:
    """GPU microseconds per call of fn, per kernel name (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for avg in prof.key_averages():
        us = getattr(avg, "self_device_time_total", None)
        if us is None:
            us = getattr(avg, "self_cuda_time_total", 0.0)
        if us > 0:
            totals[avg.key[:60]] += us
    return {name: us / iters for name, us in totals.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1x32768x16"], help="BxTxH (K = V = --dim, bf16, g per head)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args()
    dev = torch.device("cuda")
    env = environment(dev)
    base_cfg, base_pps = dict(chunk.CONFIGS), chunk.PROGRAMS_PER_SM
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        chunk_simple_gla = None
    rows, lines = [], [f"# kernel breakdown, {env.get('card')}, commit {env.get('commit')}", ""]
    for shape in args.shapes:
        B, T, H = (int(x) for x in shape.lower().split("x"))
        D = args.dim
        q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        g = -(2.0 ** (-8.0 * torch.arange(1, H + 1, device=dev, dtype=torch.float32) / H))
        do = torch.randn_like(v)

        def ours_fwd():
            with torch.no_grad():
                lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend="triton")

        def ours_fwd_bwd():
            # (autograd.grad, not .backward: no accumulation into .grad in the timed and profiled work)
            torch.autograd.grad(lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend="triton")[0], (q, k, v), do)

        providers = [("lasp_hf", ours_fwd, ours_fwd_bwd)]
        if chunk_simple_gla is not None:
            def fla_fwd():
                with torch.no_grad():
                    chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0)

            def fla_fwd_bwd():
                torch.autograd.grad(chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0)[0], (q, k, v), do)

            providers.append(("fla", fla_fwd, fla_fwd_bwd))
        for variant in args.variants:
            overrides, pps = VARIANTS[variant]
            for provider, fwd, fwd_bwd in providers:
                if provider == "fla" and variant != args.variants[0]:
                    continue
                chunk.CONFIGS.clear()
                chunk.CONFIGS.update(base_cfg, **overrides)
                chunk.PROGRAMS_PER_SM = pps or base_pps
                chunk._dense_plan.cache_clear()
                try:
                    fwd_ms = do_bench(fwd, warmup=50, rep=200, return_mode="median")
                    both_ms = do_bench(fwd_bwd, warmup=50, rep=300, return_mode="median")
                    kf, kb = kernel_times(fwd), kernel_times(fwd_bwd)
                except Exception as err:  # noqa: BLE001 - a variant may not fit (shared memory, registers)
                    print(f"{shape} {variant}: failed {err!r:.200}", flush=True)
                    continue
                name = provider if provider == "fla" else variant
                row = {"shape": shape, "variant": name, "fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms,
                       "fwd_kernels_us": kf, "fwd_bwd_kernels_us": kb}
                rows.append(row)
                text = [f"## {shape} {name}: fwd {fwd_ms:.3f} ms (kernels {sum(kf.values()) / 1e3:.3f}), "
                        f"fwd+bwd {both_ms:.3f} ms (kernels {sum(kb.values()) / 1e3:.3f})"]
                text += [f"- fwd  {us:8.1f} us  {kname}" for kname, us in kf.items()]
                text += [f"- bwd+ {us:8.1f} us  {kname}" for kname, us in kb.items() if kname not in kf]
                print("\n".join(text), flush=True)
                lines += text + [""]
    chunk.CONFIGS.clear()
    chunk.CONFIGS.update(base_cfg)
    chunk.PROGRAMS_PER_SM = base_pps
    chunk._dense_plan.cache_clear()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernel-breakdown-{card_slug(env.get('card', 'gpu'))}.json"
    path.write_text(json.dumps({"env": env, "base": {"configs": base_cfg, "pps": base_pps}, "rows": rows}, indent=1))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
