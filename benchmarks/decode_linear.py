"""The decoding step's projections, fused (`lasp_hf.kernels.triton.decode.fused_linear`) against the plain PyTorch
ops a block runs (F.rms_norm, F.linear per weight, the activation, gate, product and residual as separate kernels),
at tnl-1b's shapes (hidden 2048, 16 heads of 128, GLU 5632, bf16), one process, one card.

Each case runs as in a decoding CUDA graph: a graph of several calls, each on its own copy of the weights (together
beyond the L2 cache, as a model's 16 blocks are), timed over its replays; us per call and the weights' effective
GB/s. The fused result is checked against the plain one first (bf16 rule: relative error <= 1e-2; a case that fails
reports no time). Tiles: `--bn` / `--bd` override the launcher's (0: its own), `--warps` / `--stages` the launch.

    python3 benchmarks/decode_linear.py                                    # every case, the launcher's tiles
    python3 benchmarks/decode_linear.py --batch-sizes 1 --bn 0 8 16 32 --bd 0 128 256 512 --warps 4 8
    TRITON_INTERPRET=1 python3 benchmarks/decode_linear.py --cpu --tiny    # smoke test of the harness
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

EPS = 1e-6
L2_BYTES = 256 << 20  # the weight copies of one case together exceed this (H100 L2: 50 MB)


def weight_shapes(name: str, hidden: int, inner: int) -> list[tuple[int, int]]:
    """The weights one call of a projection reads."""
    return {"qkvu": [(hidden, hidden)] * 4, "o_proj": [(hidden, hidden)], "glu": [(inner, hidden)] * 2,
            "down": [(hidden, inner)]}[name]


def make_case(name: str, M: int, hidden: int, inner: int, device, dtype, copies: int):
    """(plain fn, fused fn) of one projection of a decoding step, on `copies` copies of its weights; each fn takes
    the copy index and returns the outputs."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    x, residual, gate = randn(M, hidden), randn(M, hidden), randn(M, hidden)
    weights = [[randn(n, d, scale=d**-0.5) for n, d in weight_shapes(name, hidden, inner)] for _ in range(copies)]
    from lasp_hf.kernels.triton.decode import fused_linear

    if name == "qkvu":  # input norm, q / k / v / output-gate projections, silu on q and k

        def plain(i):
            h = F.rms_norm(x, (hidden,), eps=EPS)
            q, k, v, u = (F.linear(h, w) for w in weights[i])
            return F.silu(q), F.silu(k), v, u

        def fused(i):
            return fused_linear(x, weights[i], acts=["silu", "silu", "identity", "identity"], norm_eps=EPS)
    elif name == "o_proj":  # output norm over all heads, times the gate, o_proj, residual

        def plain(i):
            return (residual + F.linear(gate * F.rms_norm(x, (hidden,), eps=EPS), weights[i][0]),)

        def fused(i):
            return fused_linear(x, weights[i], gate=gate, residual=residual, norm_eps=EPS)
    elif name == "glu":  # post-attention norm, gate and up projections, their product (SGLU: no activation)

        def plain(i):
            h = F.rms_norm(x, (hidden,), eps=EPS)
            return (F.linear(h, weights[i][0]) * F.linear(h, weights[i][1]),)

        def fused(i):
            return fused_linear(x, weights[i], acts=["identity", "identity"], glu=True, norm_eps=EPS)
    else:  # "down": down projection and residual
        xi = randn(M, inner)

        def plain(i):
            return (residual + F.linear(xi, weights[i][0]),)

        def fused(i):
            return fused_linear(xi, weights[i], residual=residual)
    return plain, fused


def time_us(fn, copies: int, device) -> float:
    """Microseconds per call of fn(i) over i = 0 .. copies - 1: replays of one CUDA graph of those calls on CUDA
    (as in a decoding graph), the host clock elsewhere."""
    if device.type != "cuda":
        return common.bench_ms(lambda: [fn(i) for i in range(copies)], device) * 1e3 / copies
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(copies):  # compile and warm up outside the capture
            fn(i)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    return common.bench_ms(graph.replay, device) * 1e3 / copies


def main(argv=None) -> int:
    parser = common.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--projections", nargs="*", default=["qkvu", "o_proj", "glu", "down"])
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--bn", nargs="*", type=int, default=[0], help="rows per program (0: the launcher's)")
    parser.add_argument("--bd", nargs="*", type=int, default=[0], help="columns per step (0: the launcher's)")
    parser.add_argument("--warps", nargs="*", type=int, default=[4])
    parser.add_argument("--stages", nargs="*", type=int, default=[3])
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("decode_linear.py: no CUDA device; pass --cpu --tiny (with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    from lasp_hf.kernels.triton import decode

    hidden, inner = (64, 96) if args.tiny else (2048, 5632)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    settings = list(itertools.product(args.bn, args.bd, args.warps, args.stages))
    if args.dry_run:
        for projection, M, setting in itertools.product(args.projections, args.batch_sizes, settings):
            print(projection, f"B={M}", "bn={} bd={} warps={} stages={}".format(*setting))
        return 0
    env = common.environment(device)
    print(common.describe_env(env), flush=True)
    rows = []
    defaults = decode.TILES, decode.NUM_WARPS, decode.NUM_STAGES
    for projection, M in itertools.product(args.projections, args.batch_sizes):
        nbytes = sum(n * d for n, d in weight_shapes(projection, hidden, inner)) * torch.finfo(dtype).bits // 8
        copies = 2 if args.tiny else max(2, -(-L2_BYTES // nbytes))
        plain, fused = make_case(projection, M, hidden, inner, device, dtype, copies)
        plain_us = time_us(plain, copies, device)
        for bn, bd, warps, stages in settings:
            decode.TILES = {key: value for key, value in (("BN", bn), ("BD", bd)) if value}
            decode.NUM_WARPS, decode.NUM_STAGES = warps, stages
            err = max(common.relative_error(a.float(), b.float()) for a, b in zip(fused(0), plain(0), strict=True))
            row = dict(projection=projection, B=M, bn=bn or "auto", bd=bd or "auto", warps=warps, stages=stages,
                       err=err, plain_us=plain_us, plain_gbs=nbytes / plain_us / 1e3)
            if err <= 1e-2:
                row["fused_us"] = time_us(fused, copies, device)
                row["fused_gbs"] = nbytes / row["fused_us"] / 1e3
                row["speedup"] = plain_us / row["fused_us"]
            else:
                row["status"] = f"check failed: relative error {err:.2e} > 1e-2"
            rows.append(row)
            print(f"[decode-linear] {row}", flush=True)
    decode.TILES, decode.NUM_WARPS, decode.NUM_STAGES = defaults
    columns = [common.Column("projection", "projection"), common.Column("B", "B", "{}"),
               common.Column("bn", "BN", "{}"), common.Column("bd", "BD", "{}"), common.Column("warps", "warps", "{}"),
               common.Column("stages", "stages", "{}"), common.Column("plain_us", "plain us", "{:.1f}"),
               common.Column("fused_us", "fused us", "{:.1f}"), common.Column("plain_gbs", "plain GB/s", "{:.0f}"),
               common.Column("fused_gbs", "fused GB/s", "{:.0f}"), common.Column("speedup", "plain / fused", "{:.2f}"),
               common.Column("err", "rel err", "{:.1e}")]
    print(common.format_table(rows, columns), flush=True)
    name = f"decode-linear-{common.card_slug(env['card'])}" + ("-tiny" if args.tiny else "")
    common.write_results(name, env, rows, columns, out_dir=args.out,
                         notes=["us per call inside a CUDA graph of calls on distinct weight copies (beyond L2)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
