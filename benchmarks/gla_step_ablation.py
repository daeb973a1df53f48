"""Where a GLA scan step's time goes: the output scan of the per-key-channel decay (one program per segment and
head, the whole K x V state in registers, BT tokens per step: o = A v + (q exp(b)) S, S = diag(exp(b_last)) S +
(k exp(b_last - b))^T v) as a stand-alone kernel with each part switchable, timed part by part on one card.

    python3 benchmarks/gla_step_ablation.py                                 # 32K, 64-token steps, every variant
    python3 benchmarks/gla_step_ablation.py --tokens 32K --steps 64 32 16
    TRITON_INTERPRET=1 python3 benchmarks/gla_step_ablation.py --cpu --tiny  # smoke test of the harness

Variants (each removes one part from "full", which mirrors `gla_kernels.gla_fwd_kernel_output`'s step):
"no-cumsum" reads g as the step's cumulative decay (no scans over the step's tokens), "no-exp" skips the three
decay factors, "no-g" reads no g at all (no decay), "no-split" multiplies by the state's bf16 rounding (one
product instead of hi + lo), "no-A" drops the intra-step product A v (and A's read), "bare" is only the state's
products (what a decay per head costs, as the per-head scans). The time of "full" minus a variant is what that part
costs. Output: a table, `gla-step-ablation-<card>.json` + `.md`. Timing only: the variants compute different things
(no error check beyond finite outputs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from lasp_hf.kernels.triton import chunk  # noqa: E402
from lasp_hf.kernels.triton.chunk_kernels import _dot_f32_left, _dot_f32_right, _token_tiles  # noqa: E402
from lasp_hf.kernels.triton.gla_kernels import _gla_step_decay, _masked_exp  # noqa: E402
from lasp_hf.kernels.triton.utils import interpreting  # noqa: E402

# name: (G_SOURCE: 0 none / 1 g with the step's scans / 2 g as the cumulative decay, EXP, SPLIT, LOAD_A)
VARIANTS = {
    "full": (1, True, True, True),
    "no-cumsum": (2, True, True, True),
    "no-exp": (1, False, True, True),
    "no-g": (0, False, True, True),
    "no-split": (1, True, False, True),
    "no-A": (1, True, True, False),
    "bare": (0, False, False, False),
}


@triton.jit
def _step_kernel(q, k, v, g, A, o, SEG: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BT: tl.constexpr, DT: tl.constexpr, G_SOURCE: tl.constexpr, EXP: tl.constexpr, SPLIT: tl.constexpr,
                 LOAD_A: tl.constexpr):
    """One program per (segment of SEG tokens, head): the output scan's steps from a zero state."""
    i_s, i_h = tl.program_id(0), tl.program_id(1)
    bos = (i_s * SEG).to(tl.int64)
    eos = bos + SEG
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, K)
    causal = o_t[:, None] >= o_t[None, :]
    state = tl.zeros([K, V], dtype=tl.float32)
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, K)
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, K)
    tiles_v = _token_tiles(v, bos, eos, i_h, H, V, BT, V)
    tiles_o = _token_tiles(o, bos, eos, i_h, H, V, BT, V)
    tiles_A = _token_tiles(A, bos, eos, i_h, H, BT, BT, BT)
    for i in range(SEG // BT):
        r0 = i * BT
        t0 = bos + r0
        b_q = tiles_q.load([r0, 0]).to(tl.float32)
        b_k = tiles_k.load([r0, 0]).to(tl.float32)
        b_v = tiles_v.load([r0, 0]).to(DT)
        if G_SOURCE == 1:
            b, r, b_last, r_last = _gla_step_decay(g, i_h, t0, eos - t0, o_k, H, K, BT)
        elif G_SOURCE == 2:
            b = tl.load(g + (t0 + o_t[:, None]) * (H * K) + i_h * K + o_k[None, :])
            r = b * 0.0
            b_last = tl.load(g + (t0 + BT - 1) * (H * K) + i_h * K + o_k)
            r_last = b_last * 0.0
        else:
            b = tl.zeros([BT, K], dtype=tl.float32)
            r = b
            b_last = tl.zeros([K], dtype=tl.float32)
            r_last = b_last
        if LOAD_A:
            scores = tl.where(causal, tiles_A.load([r0, 0]), 0.0)
            b_o = tl.dot(scores.to(DT), b_v)
        else:
            b_o = tl.zeros([BT, V], dtype=tl.float32)
        if EXP:
            q_dec = b_q * _masked_exp(b, r == 0)
            k_dec = b_k * _masked_exp(b_last[None, :] - b, r == r_last[None, :])
            s_dec = _masked_exp(b_last, r_last == 0)
        else:
            q_dec = b_q + b * 0.0
            k_dec = b_k + b * 0.0
            s_dec = 1.0 + b_last * 0.0
        b_o += _dot_f32_right(q_dec.to(DT), state, DT, "tf32", SPLIT)
        tiles_o.store([r0, 0], b_o.to(o.dtype.element_ty))
        state = state * s_dec[:, None] + _dot_f32_left(tl.trans(k_dec), b_v, DT, "tf32", SPLIT)


def run_variant(tensors: dict, name: str, seg: int, steps: int):
    q, k, v, g, A, o = (tensors[n] for n in ("q", "k", "v", "g", "A", "o"))
    T, H, K = q.shape
    g_source, use_exp, split, load_a = VARIANTS[name]
    cfg = {}
    if not interpreting():
        triton.set_allocator(chunk._scratch)
        cfg = {"num_warps": 8, "num_stages": 2}
    _step_kernel[(T // seg, H)](q, k, v, g, A, o, SEG=seg, H=H, K=K, V=v.shape[-1], BT=steps,
                                DT=chunk._dot_dtype(q.dtype), G_SOURCE=g_source, EXP=use_exp,
                                SPLIT=split and q.dtype != torch.float32, LOAD_A=load_a, **cfg)
    return o


def main(argv=None) -> int:
    parser = common.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="*", default=["32K"], help="sequence lengths (B = 1)")
    parser.add_argument("--steps", nargs="*", type=int, default=[64], help="tokens per step")
    parser.add_argument("--segment", type=int, default=1024, help="tokens per segment (one program each)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gla_step_ablation.py: no CUDA device; pass --cpu --tiny (with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    H, K = (2, 32) if args.tiny else (16, 128)
    seg = 64 if args.tiny else args.segment
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    env = common.environment(device)
    print(common.describe_env(env), flush=True)
    rows = []
    for tokens in args.tokens:
        T = 128 if args.tiny else common.parse_length(tokens)
        gen = torch.Generator(device=device).manual_seed(0)
        tensors = {n: torch.randn(T, H, K, device=device, generator=gen).to(dtype) for n in ("q", "k", "v")}
        tensors["g"] = torch.nn.functional.logsigmoid(torch.randn(T, H, K, device=device, generator=gen)) / 16
        tensors["o"] = torch.empty_like(tensors["v"])
        for steps in args.steps:
            tensors["A"] = torch.randn(T, H, steps, device=device, generator=gen) * 0.01
            full_ms = None
            for name in args.variants:
                out = run_variant(tensors, name, seg, steps)
                finite = bool(torch.isfinite(out.float()).all())
                ms = common.bench_ms(lambda name=name: run_variant(tensors, name, seg, steps), device)
                full_ms = ms if name == "full" else full_ms
                row = dict(T=T, steps=steps, variant=name, ms=ms, finite=finite,
                           us_per_step=ms * 1e3 / _steps_in_sequence(device, T // seg * H, seg // steps))
                if full_ms is not None and name != "full":
                    row["part_ms"] = full_ms - ms
                rows.append(row)
                print(f"[ablation] T={T} steps={steps} {name}: {ms:.3f} ms{'' if finite else ' (non-finite!)'}",
                      flush=True)
    columns = [common.Column("T", "T", "{}"), common.Column("steps", "steps", "{}"),
               common.Column("variant", "variant"), common.Column("ms", "ms", "{:.3f}"),
               common.Column("part_ms", "full - variant (ms)", "{:.3f}"),
               common.Column("us_per_step", "us per step per SM", "{:.2f}"), common.Column("finite", "finite")]
    print(common.format_table(rows, columns), flush=True)
    common.write_results(f"gla-step-ablation-{common.card_slug(env['card'])}", env, rows, columns, out_dir=args.out,
                         notes=[f"B = 1, H = {H}, K = V = {K}, {seg}-token segments, one program per segment and head"])
    return 0 if all(row["finite"] for row in rows) else 1


def _steps_in_sequence(device, programs: int, steps_per_program: int) -> float:
    """The steps one SM walks one after another: one program per SM at a time (the whole state in registers)."""
    return programs / min(programs, chunk._num_sms(device)) * steps_per_program


if __name__ == "__main__":
    sys.exit(main())
