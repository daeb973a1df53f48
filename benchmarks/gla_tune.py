"""Settings of the per-key-channel (GLA) Triton kernels, side by side in one process on one card: forward and
forward + backward of `linear_attention` with g [B, T, H, K] at the kernel benchmark's shape (bf16, B = 1, H = 16,
K = V = 128, GLA's gates: log-sigmoid of a normal over 16), each kernel's share (torch.profiler), and the error of
o and every gradient against the float32 PyTorch reference at --check-tokens.

    python3 benchmarks/gla_tune.py                                   # the default grid at 32K
    python3 benchmarks/gla_tune.py --tokens 32K 128K --steps 16 32 --fwd-bv 128 64 --bwd-bk 64 32
    TRITON_INTERPRET=1 python3 benchmarks/gla_tune.py --cpu --tiny   # smoke test of the harness

A setting: `steps` = gla_chunk.STEP_TOKENS (tokens per step of the output, dq, dk and dv scans), `state_steps` =
STATE_STEP_TOKENS (the segment-state passes), `fwd_bv` = the V block of the output and dv kernels (which hold all
of K), `bwd_bk` = the K block of dq / dk (which hold all of V), `warps` of those four kernels, `span` =
FACTORED_SPAN (the largest decay over a step that takes the tensor-core form; < 0: elementwise only),
`split_state` = SPLIT_STATE (the output and dv kernels' products with the state in hi + lo parts), `intra` =
INTRA_PRECISION (operands of the intra-step products: split, bf16, tf32), `segment_chunks` = chunk.CHUNKS_PER_SEGMENT
(the scans' segment length in 64-token chunks; 0: the planner's). The grid is the product of the lists
given. With `--fla` (flash-linear-attention installed), fla's chunk_gla runs first on the same inputs, timed and
checked the same way (its row is the yardstick of speed and error). Output: a table, `gla-tune-<card>.json` + `.md`.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

import lasp_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def gates(shape, device, seed: int) -> tuple:
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T, H, K = shape
    q, k, v = (torch.randn(B, T, H, K, device=device, generator=gen) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=device, generator=gen)) / 16
    return q, k, v, g


def attention(backend: str):
    """(q, k, v, g) -> o of `linear_attention` with backend, or of fla's chunk_gla ("fla")."""
    if backend == "fla":
        from fla.ops.gla import chunk_gla

        return lambda q, k, v, g: chunk_gla(q, k, v, g, scale=q.shape[-1] ** -0.5)[0]
    return lambda q, k, v, g: lasp_hf.linear_attention(q, k, v, g, backend=backend)[0]


def fwd_bwd(q, k, v, g, do, backend: str) -> list:
    """[o, dq, dk, dv, dg] of one forward + backward."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g)]
    o = attention(backend)(*leaves)
    o.backward(do)
    return [o.detach()] + [x.grad for x in leaves]


def apply(setting: dict) -> None:
    from lasp_hf.kernels.triton import gla_chunk

    gla_chunk.STEP_TOKENS = setting["steps"]
    gla_chunk.STATE_STEP_TOKENS = setting["state_steps"]
    gla_chunk.FACTORED_SPAN = setting["span"]
    gla_chunk.SPLIT_STATE = bool(setting["split_state"])
    gla_chunk.INTRA_PRECISION = setting["intra"]
    from lasp_hf.kernels.triton import chunk

    chunk.CHUNKS_PER_SEGMENT = setting["segment_chunks"] or None
    K = V = setting["K"]
    gla_chunk.CONFIGS["fwd"] = (K * setting["fwd_bv"], setting["warps"], 2)
    gla_chunk.CONFIGS["dv"] = (K * setting["fwd_bv"], setting["warps"], 2)
    gla_chunk.CONFIGS["bwd"] = (setting["bwd_bk"] * V, setting["warps"], 2)


def main(argv=None) -> int:
    parser = common.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="*", default=["32K"], help="sequence lengths (32K 128K)")
    parser.add_argument("--steps", nargs="*", type=int, default=[16, 32])
    parser.add_argument("--state-steps", nargs="*", type=int, default=[32])
    parser.add_argument("--fwd-bv", nargs="*", type=int, default=[128, 64])
    parser.add_argument("--bwd-bk", nargs="*", type=int, default=[64, 32])
    parser.add_argument("--warps", nargs="*", type=int, default=[8])
    parser.add_argument("--span", nargs="*", type=float, default=[40.0])
    parser.add_argument("--split-state", nargs="*", type=int, default=[1], help="SPLIT_STATE: 1, 0 or both")
    parser.add_argument("--intra", nargs="*", default=["split"], choices=("split", "bf16", "tf32"),
                        help="INTRA_PRECISION values")
    parser.add_argument("--segment-chunks", nargs="*", type=int, default=[0],
                        help="chunk.CHUNKS_PER_SEGMENT (64-token chunks per segment; 0: the planner's choice)")
    parser.add_argument("--fla", action="store_true", help="fla's chunk_gla first, as the yardstick")
    parser.add_argument("--fla-only", action="store_true",
                        help="fla's chunk_gla alone (its first call autotunes for minutes: a run of its own)")
    parser.add_argument("--check-tokens", default="4K", help="length of the error check (default 4K)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gla_tune.py: no CUDA device; pass --cpu --tiny (with TRITON_INTERPRET=1) for a smoke run",
              file=sys.stderr)
        return 2
    H, K = (2, 32) if args.tiny else (16, 128)
    lengths = [min(common.parse_length(t), 80) if args.tiny else common.parse_length(t) for t in args.tokens]
    check_T = 40 if args.tiny else common.parse_length(args.check_tokens)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    keys = ("steps", "state_steps", "fwd_bv", "bwd_bk", "warps", "span", "split_state", "intra", "segment_chunks")
    grid = [dict(zip(keys, values), K=K)
            for values in itertools.product(args.steps, args.state_steps, args.fwd_bv, args.bwd_bk, args.warps,
                                            args.span, args.split_state, args.intra, args.segment_chunks)]
    if args.fla_only:
        grid = []
    if args.fla or args.fla_only:
        grid.insert(0, dict(fla=True, K=K))
    if args.dry_run:
        print("\n".join(str(setting) for setting in grid))
        return 0
    env = common.environment(device)
    print(common.describe_env(env), flush=True)

    q, k, v, g = gates((1, check_T, H, K), device, seed=0)
    do = torch.randn(1, check_T, H, K, device=device)
    ref = fwd_bwd(q.float(), k.float(), v.float(), g, do, "torch")
    rows = []
    for setting in grid:
        backend = "fla" if setting.get("fla") else "triton"
        if backend == "triton":
            apply(setting)
        label = "fla chunk_gla" if backend == "fla" else \
            " ".join(f"{key}={value}" for key, value in setting.items() if key != "K")
        out = fwd_bwd(q.to(dtype), k.to(dtype), v.to(dtype), g, do.to(dtype), backend)
        errors = {name: common.relative_error(x.float(), r) for name, x, r in
                  zip(("o", "dq", "dk", "dv", "dg"), out, ref, strict=True)}
        for T in lengths:
            *x, gT = gates((1, T, H, K), device, seed=1)
            leaves = [t.to(dtype).requires_grad_() for t in x] + [gT.requires_grad_()]
            dout = torch.randn(1, T, H, K, device=device, dtype=dtype)

            def forward(leaves=leaves, fn=attention(backend)):
                return fn(*leaves)

            def both(leaves=leaves, dout=dout):  # gradients returned, not accumulated into .grad
                return torch.autograd.grad(forward(leaves), leaves, dout)

            row = dict(setting=label, T=T, fwd_ms=common.bench_ms(forward, device),
                       fwd_bwd_ms=common.bench_ms(both, device), **{f"err_{n}": e for n, e in errors.items()})
            _, per_kernel = common.cuda_kernel_times(both, device, calls=3)
            shown = [(name, ms) for name, ms in per_kernel.items() if name.startswith("gla_") or backend == "fla"]
            row["kernels"] = " ".join(f"{name.removeprefix('gla_')[:40]}={ms:.2f}" for name, ms in shown[:8])
            rows.append(row)
            print(f"[gla-tune] T={T} {label}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms, "
                  f"err o {errors['o']:.2e} dg {errors['dg']:.2e}; {row['kernels']}", flush=True)
    columns = [common.Column("setting", "setting"), common.Column("T", "T", "{}"),
               common.Column("fwd_ms", "fwd ms", "{:.3f}"), common.Column("fwd_bwd_ms", "fwd+bwd ms", "{:.3f}"),
               common.Column("err_o", "err o", "{:.2e}"), common.Column("err_dq", "err dq", "{:.2e}"),
               common.Column("err_dk", "err dk", "{:.2e}"), common.Column("err_dv", "err dv", "{:.2e}"),
               common.Column("err_dg", "err dg", "{:.2e}"), common.Column("kernels", "kernels (ms)")]
    print(common.format_table(rows, columns), flush=True)
    name = f"gla-tune-{common.card_slug(env['card'])}"
    common.write_results(name, env, rows, columns, out_dir=args.out,
                         notes=[f"errors against the float32 PyTorch reference at {check_T} tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
