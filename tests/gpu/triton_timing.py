"""Times the Triton op (forward, forward+backward) beside fla's chunk_simple_gla, sweeps the kernels'
launch configs, and prints a table. Run on a GPU machine: python tests/gpu/triton_timing.py OUT_DIR [sweep].
Give it several minutes on a fresh machine: fla autotunes its kernels at the first call of each shape."""

from __future__ import annotations

import itertools
import json
import sys

import torch
import triton
from triton.testing import do_bench

import lasp_hf
from lasp_hf.kernels.triton import chunk

try:
    from fla.ops.simple_gla import chunk_simple_gla
except Exception as err:  # noqa: BLE001 - fla is optional on the device
    print("fla not importable:", err)
    chunk_simple_gla = None

SHAPES = [(1, 8192, 16), (1, 32768, 16), (1, 131072, 16), (8, 4096, 32), (8, 16384, 32)]
K = V = 128


def make(B, T, H, dtype=torch.bfloat16):
    q, k, v = (torch.randn(B, T, H, K, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    g = -(2.0 ** (-8.0 * torch.arange(1, H + 1, device="cuda", dtype=torch.float32) / H))
    return q, k, v, g, torch.randn(B, T, H, V, device="cuda", dtype=dtype)


def ours(q, k, v, g):
    return lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend="triton")[0]


def fla(q, k, v, g):
    return chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0)[0]


def time_fn(fn, q, k, v, g, do):
    with torch.no_grad():
        fwd = do_bench(lambda: fn(q, k, v, g), warmup=50, rep=200, return_mode="median")

    def step():
        fn(q, k, v, g).backward(do)

    both = do_bench(step, warmup=50, rep=300, grad_to_none=[q, k, v], return_mode="median")
    return fwd, both


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    sweep = len(sys.argv) > 2 and sys.argv[2] == "sweep"
    props = torch.cuda.get_device_properties(0)
    info = {"card": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "configs": dict(chunk.CONFIGS), "programs_per_sm": chunk.PROGRAMS_PER_SM}
    rows = []
    for B, T, H in SHAPES:
        q, k, v, g, do = make(B, T, H)
        row = {"B": B, "T": T, "H": H}
        row["ours_fwd"], row["ours_fwdbwd"] = time_fn(ours, q, k, v, g, do)
        if chunk_simple_gla is not None:
            row["fla_fwd"], row["fla_fwdbwd"] = time_fn(fla, q, k, v, g, do)
        rows.append(row)
        print("row", json.dumps(row), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
    # Accuracy against float64 at T = 4096 (the issue quotes fla at 0.39%).
    sys.path.insert(0, "tests")
    from triton_reference64 import chunked64, rel_err
    q, k, v, g, _ = make(1, 4096, 16)
    o64, _ = chunked64(q, k, v, g, 1.0)
    acc = {"ours": rel_err(ours(q, k, v, g), o64), "torch_ref": rel_err(
        lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend="torch")[0], o64)}
    if chunk_simple_gla is not None:
        acc["fla"] = rel_err(fla(q, k, v, g), o64)
    # Decode step, microseconds.
    decode = {}
    for B in (1, 64):
        qs, ks, vs = (torch.randn(B, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        state = torch.randn(B, 16, 128, 128, device="cuda")
        decode[B] = 1000 * do_bench(lambda: lasp_hf.linear_attention_step(qs, ks, vs, g, state=state,
                                                                          backend="triton"), return_mode="median")
    sweeps = []
    if sweep:
        base_cfg, base_pps = dict(chunk.CONFIGS), chunk.PROGRAMS_PER_SM
        fwd_cfgs = [(8192, 8, 2), (8192, 4, 2), (16384, 8, 2), (8192, 8, 3)]
        bwd_cfgs = [(8192, 8, 2), (8192, 4, 2), (4096, 4, 2), (16384, 8, 2)]
        for B, T, H in [(1, 32768, 16), (8, 16384, 32)]:
            q, k, v, g, do = make(B, T, H)
            for (fc, bc), pps in itertools.product(zip(fwd_cfgs, bwd_cfgs), (1, 2, 4)):
                if B * H >= 132 and pps != 2:
                    continue
                chunk.CONFIGS.update(fwd=fc, bwd=bc)
                chunk.PROGRAMS_PER_SM = pps
                chunk._dense_plan.cache_clear()
                try:
                    f, fb = time_fn(ours, q, k, v, g, do)
                except Exception as err:  # noqa: BLE001 - a config may not fit
                    f = fb = float("nan")
                    print("config failed", fc, bc, pps, repr(err)[:200])
                sweeps.append({"B": B, "T": T, "H": H, "fwd_cfg": fc, "bwd_cfg": bc, "pps": pps, "fwd": f,
                               "fwdbwd": fb})
                print(f"sweep B{B} T{T} H{H} fwd{fc} bwd{bc} pps{pps}: fwd {f:.3f} fwd+bwd {fb:.3f}", flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()
        chunk.CONFIGS.update(base_cfg)
        chunk.PROGRAMS_PER_SM = base_pps
    with open(f"{out}/timing.json", "w") as f:
        json.dump({"info": info, "rows": rows, "accuracy_T4096": acc, "decode_us": decode, "sweep": sweeps}, f,
                  indent=1)
    print(json.dumps(info))
    print(f"accuracy vs float64 (B1 T4096 H16 bf16, o): {acc}")
    print(f"decode step us: {decode}")
    print(f"{'B':>2} {'T':>7} {'H':>3} | {'ours fwd':>9} {'fla fwd':>8} {'ratio':>6} | {'ours f+b':>9} {'fla f+b':>8} "
          f"{'ratio':>6}")
    for r in rows:
        ff, fb = r.get("fla_fwd", float("nan")), r.get("fla_fwdbwd", float("nan"))
        print(f"{r['B']:>2} {r['T']:>7} {r['H']:>3} | {r['ours_fwd']:9.3f} {ff:8.3f} {r['ours_fwd'] / ff:6.2f} | "
              f"{r['ours_fwdbwd']:9.3f} {fb:8.3f} {r['ours_fwdbwd'] / fb:6.2f}")


if __name__ == "__main__":
    main()
