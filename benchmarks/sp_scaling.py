"""Sequence-parallel scaling: forward + backward of linear attention split over W ranks, against one GPU and the
LASP reference.

    torchrun --standalone --nproc_per_node 4 benchmarks/sp_scaling.py                # NCCL, one GPU per rank
    torchrun --standalone --nproc_per_node 4 benchmarks/sp_scaling.py --cuda-graphs  # the GPUs' side alone
    torchrun --standalone --nproc_per_node 2 benchmarks/sp_scaling.py --cpu --tiny   # gloo smoke test

Every rank holds T local tokens of one sequence of W*T (B=1, H=16, K=V=128, bf16, scale 1.0, g_h = -2^(-8(h+1)/H);
with --decay channel, GLA's per-key-channel gates logsigmoid(x) / 16, g [B, T, H, K], which then get a gradient).
Rows, all from one launch:
    single     lasp_hf.linear_attention on the rank's T tokens alone (the W=1 time at this local T)
    ring       linear_attention(..., sp_group=ctx, sp_mode="ring")       (LASP: the state hops)
    allgather  linear_attention(..., sp_group=ctx, sp_mode="allgather")  (LASP-2)
    lasp-ref   lasp.lasp_fuse_parallel, the LASP paper's code (GPU only)
Before timing, each SP row's o, dq, dk, dv on every rank are checked against the unsharded op run on the whole
sequence; a failing row is FAILED and gets no ratio. Timing: after one barrier, --iters steps back to back (the host
runs ahead, as in training), CUDA events around the loop, per step; the slowest rank, median over --repeats loops.
`host ms`: the host's time to issue one step (where it reaches `ms`, the row measures the host, not the GPUs).
efficiency = single ms / ms; vs lasp = tokens/s over lasp-ref's. Writes sp-<card>-W<n>.json (+ .md) from rank 0.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import KI, TOLERANCE, Column, slopes
from common import leaves as _leaves

PROVIDERS = ("single", "ring", "allgather", "lasp-ref")
HOST_PROBE_ITERS = 4  # steps whose issuing is timed on the host right after a synchronize
CASES = common.Registry()


class Run:
    def __init__(self, args, device: torch.device, sp, lasp_missing: str | None):
        self.device, self.sp, self.lasp_missing = device, sp, lasp_missing
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.dtype = getattr(torch, args.dtype or ("float32" if args.cpu else "bfloat16"))
        self.backend = args.backend or ("torch" if args.cpu else "triton")
        self.tiny, self.layers, self.repeats = args.tiny, args.layers, args.repeats
        self.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3)
        self.iters = args.iters if args.iters is not None else (3 if args.cpu else 10)
        self.providers = tuple(p for p in PROVIDERS if p in args.providers)
        self.cuda_graphs = args.cuda_graphs and device.type == "cuda"
        self.decay = args.decay  # "head": g [H]; "channel": g [B, T, H, K] (GLA)

    def shape(self, B: int, T: int, H: int, D: int) -> tuple[int, int, int, int]:
        return (B, T, H, D) if not self.tiny else (B, min(T // 128 + 1, 131), min(H, 2), 16)


def comm_bytes(provider: str, W: int, B: int, H: int, K: int, V: int) -> dict:
    """Bytes sent per layer, forward + backward: by the busiest rank, and over all ranks. ring / lasp-ref: one
    float32 state [B, H, K, V] per hop forward and one state gradient per hop backward; allgather: all_gather of
    (state, decay [B, H]) forward and its reduce_scatter backward, (W-1) entries sent per rank each."""
    state = B * H * K * V * 4
    if provider == "single" or W == 1:
        return {"per_rank": 0, "total": 0}
    if provider in ("ring", "lasp-ref"):
        return {"per_rank": 2 * state if W > 2 else state, "total": 2 * (W - 1) * state}
    entry = state + B * H * 4
    return {"per_rank": 2 * (W - 1) * entry, "total": 2 * W * (W - 1) * entry}


def all_ranks_max(run: Run, value: float) -> float:
    x = torch.tensor([value], dtype=torch.float64, device=run.device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x.item())


def time_steps(run: Run, step) -> dict:
    """`repeats` loops of `iters` back-to-back steps, each loop after ONE barrier: per step, the slowest rank's
    median (ms), every rank's median (rank_ms) and the host's time to issue a step (host_ms, from the first
    HOST_PROBE_ITERS steps after a synchronize, so a full launch queue cannot block them; on CPU the step)."""
    cuda = run.device.type == "cuda"
    for _ in range(run.warmup):
        step()
    totals, host = [], []
    probe = min(HOST_PROBE_ITERS, run.iters)
    for _ in range(run.repeats):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(run.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        begin = time.perf_counter()
        for i in range(run.iters):
            step()
            if i + 1 == probe:
                host.append((time.perf_counter() - begin) * 1e3 / probe)
        if cuda:
            end.record()
            end.synchronize()
            totals.append(start.elapsed_time(end) / run.iters)
        else:
            totals.append((time.perf_counter() - begin) * 1e3 / run.iters)
            host[-1] = totals[-1]
    mine = torch.tensor([totals, host], dtype=torch.float64, device=run.device)
    every = [torch.empty_like(mine) for _ in range(run.world_size)]
    dist.all_gather(every, mine)
    every = torch.stack(every).cpu()  # [W, 2, repeats]
    return {"ms": float(every[:, 0].max(dim=0).values.median()),
            "rank_ms": [float(r.median()) for r in every[:, 0]],
            "host_ms": float(every[:, 1].max(dim=0).values.median())}


# ----------------------------------------------------------------------------- providers


def prepare(run: Run, provider: str, q, k, v, g, do):
    """(forward, leaves, do, to_bthd) for one provider on this rank's slice; forward(q, k, v) runs one layer on the
    given inputs (default: the leaves), in the provider's layout."""
    import lasp_hf

    if provider in ("single", "ring", "allgather"):
        lq, lk, lv = _leaves(q, k, v)
        sp_args = {} if provider == "single" else {"sp_group": run.sp, "sp_mode": provider}

        def forward(q=lq, k=lk, v=lv):
            return lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend=run.backend, **sp_args)[0]

        return forward, [lq, lk, lv], do, lambda t: t
    from lasp import lasp_fuse_parallel

    lq, lk, lv = _leaves(*(x.transpose(1, 2).contiguous() for x in (q, k, v)))
    s = (-g).view(-1, 1, 1).contiguous()
    kv = torch.zeros(*lq.shape[:2], lq.shape[-1], lv.shape[-1], dtype=torch.float32, device=q.device)

    def forward(q=lq, k=lk, v=lv):  # it writes its state buffers in place: a pair per layer, as in a model
        return lasp_fuse_parallel(q, k, v, s, torch.zeros_like(kv), torch.zeros_like(kv))

    return forward, [lq, lk, lv], do.transpose(1, 2).contiguous(), lambda t: t.transpose(1, 2)


def layer_stack(forward, leaves: list, upstream, layers: int):
    """A step of `layers` layers as in a model: layer l > 0 takes layer l-1's output as its queries and its own k, v
    leaves; ONE backward call through all (the autograd engine's fixed cost is paid once per step, as in training)."""
    own = [_leaves(leaves[1], leaves[2]) for _ in range(layers - 1)]
    every = leaves + [x for pair in own for x in pair]

    def step():
        o = forward()
        for k, v in own:
            o = forward(o, k, v)
        return torch.autograd.grad(o, every, upstream)

    return step


def cuda_graphed(run: Run, step):
    """`step` captured once in a CUDA graph: (replay, the largest relative error of a replay's gradients against an
    eager step's). A replay costs the host ~10 us, so replayed rows measure the GPUs and the exchange, not how fast
    this host issues them. Needs the SP exchanges on the SP context's own NCCL communicator (the default on NCCL)."""
    eager = [x.clone() for x in step()]
    side = torch.cuda.Stream(run.device)
    side.wait_stream(torch.cuda.current_stream(run.device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            step()
    torch.cuda.current_stream(run.device).wait_stream(side)
    torch.cuda.synchronize(run.device)
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    # thread_local: the process group's watchdog thread may query CUDA events while this thread captures.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = step()
    torch.cuda.synchronize(run.device)
    dist.barrier()
    graph.replay()
    torch.cuda.synchronize(run.device)
    return graph.replay, max(common.relative_error(got, ref) for got, ref in zip(outputs, eager))


# ----------------------------------------------------------------------------- the case


def _inputs(run: Run, T: int, seed: int):
    """The same full sequence on every rank (same seed): (q, k, v, do) of W*T tokens and g."""
    B, T, H, D = run.shape(1, T, 16, 128)
    gen = torch.Generator(device=run.device).manual_seed(seed)
    full = [torch.randn(B, run.world_size * T, H, D, device=run.device, dtype=run.dtype, generator=gen)
            for _ in range(4)]
    if run.decay == "channel":
        g = torch.nn.functional.logsigmoid(torch.randn(B, run.world_size * T, H, D, device=run.device, generator=gen))
        return full, g / 16, T
    return full, -slopes(H).to(run.device), T


@CASES.case("sp", dict(T=8 * KI), dict(T=32 * KI), dict(T=128 * KI))
def sp_case(run: Run, name: str, T: int) -> list[dict]:
    """Every provider at local length T: check against the unsharded op, then time fwd+bwd."""
    import lasp_hf

    full, g, T = _inputs(run, T, 0)
    B, _, H, D = full[0].shape
    W = run.world_size
    leaves = _leaves(*full[:3])
    o_full = lasp_hf.linear_attention(*leaves, g, scale=1.0, backend=run.backend)[0]
    cut = slice(run.rank * T, (run.rank + 1) * T)  # this rank's tokens
    ref = {n: x[:, cut].detach().clone()
           for n, x in zip(("o", "dq", "dk", "dv"), (o_full,) + torch.autograd.grad(o_full, leaves, full[3]))}
    q, k, v, do = (x[:, cut].contiguous() for x in full)
    if run.decay == "channel":  # this rank's slice, with a gradient as in a GLA layer (dg is computed and timed)
        g = g[:, cut].detach().clone().requires_grad_()
    del full, leaves, o_full
    rows = []
    for provider in run.providers:
        nbytes = comm_bytes(provider, W, B, H, D, D)
        row = {"case": name, "provider": provider, "W": W, "B": B, "T_local": T, "T_total": W * T, "H": H, "K": D,
               "V": D, "comm_mb_per_rank": nbytes["per_rank"] / 2**20, "comm_mb_total": nbytes["total"] / 2**20}
        if provider == "lasp-ref" and (run.lasp_missing or run.decay == "channel"):
            rows.append({**row, "status": "SKIP", "note": run.lasp_missing or "no decay per key channel"})
            continue
        rows.append(_check_and_time(run, provider, row, (q, k, v, g, do), ref))
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    _add_ratios(rows)
    return rows


def _agree(run: Run, failure: str | None, what: str) -> str | None:
    """Every rank must take the same branch, or the collectives that follow would hang."""
    return (failure or f"{what} failed on another rank") if all_ranks_max(run, 1.0 if failure else 0.0) else None


def _check_and_time(run: Run, provider: str, row: dict, inputs: tuple, ref: dict) -> dict:
    failure, errors = None, {}
    try:
        forward, leaves, upstream, to_bthd = prepare(run, provider, *inputs)
        o = forward()
        grads = torch.autograd.grad(o, leaves, upstream)
        errors = {n: common.relative_error(to_bthd(x), ref[n]) for n, x in zip(("o", "dq", "dk", "dv"), (o, *grads))}
        # Kept alive, this autograd graph (holding the leaves' AccumulateGrad nodes, made on the default stream)
        # would make a captured backward join the default stream.
        del o, grads
    except Exception as err:  # noqa: BLE001 - reported in the row; the other providers still run
        traceback.print_exc()
        failure = f"{type(err).__name__}: {err}".splitlines()[0][:160]
    if failure := _agree(run, failure, provider):
        return {**row, "status": "ERROR", "note": failure}
    if provider == "single":
        # Only rank 0's o and dq are those of the whole sequence (the others lack the carried state).
        err = all_ranks_max(run, max(errors["o"], errors["dq"]) if run.rank == 0 else 0.0)
        row["note"] = "checked: rank 0's o and dq; no communication"
    else:
        err = all_ranks_max(run, max(errors.values()))
    row.update(err=err, status="ok" if err <= TOLERANCE[run.dtype] else "FAILED", layers=run.layers)
    step = layer_stack(forward, leaves, upstream, run.layers)
    if run.cuda_graphs and provider != "lasp-ref":
        failure, graph_err = None, 0.0
        try:
            step, graph_err = cuda_graphed(run, step)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            failure = f"CUDA graph: {type(err).__name__}: {err}".splitlines()[0][:160]
        if failure := _agree(run, failure, "CUDA graph"):
            return {**row, "status": "ERROR", "note": failure}
        row.update(cuda_graph=True, graph_err=all_ranks_max(run, graph_err))
        if row["graph_err"] > TOLERANCE[run.dtype]:
            row["status"] = "FAILED"
    timing = time_steps(run, step)
    per = 1.0 / run.layers  # every time is per layer
    tokens = row["B"] * row["T_local"] * (1 if provider == "single" else run.world_size)
    row.update(ms=timing["ms"] * per, rank_ms=[x * per for x in timing["rank_ms"]], host_ms=timing["host_ms"] * per)
    row["tokens_per_s"] = tokens / (row["ms"] * 1e-3)
    return row


def _add_ratios(rows: list[dict]) -> None:
    """efficiency = single ms / ms at the same local T; vs_lasp = tokens/s over lasp-ref's; between passing rows."""
    ok = {row["provider"]: row for row in rows if row.get("status") == "ok"}
    for row in rows:
        if row.get("status") == "ok" and row["provider"] in ("ring", "allgather", "lasp-ref"):
            if "single" in ok:
                row["efficiency"] = ok["single"]["ms"] / row["ms"]
            if "lasp-ref" in ok and row["provider"] != "lasp-ref":
                row["vs_lasp"] = row["tokens_per_s"] / ok["lasp-ref"]["tokens_per_s"]


# ----------------------------------------------------------------------------- main

COLUMNS = [Column("case", "case"), Column("W", "W"), Column("provider", "provider"), Column("ms", "ms", "{:.3f}"),
           Column("host_ms", "host ms", "{:.3f}"), Column("tokens_per_s", "tok/s", "{:.3e}"),
           Column("efficiency", "eff", "{:.2f}"), Column("vs_lasp", "vs lasp", "{:.1f}x"),
           Column("comm_mb_per_rank", "comm MB/rank", "{:.3g}"), Column("err", "rel err", "{:.2e}"),
           Column("status", "status")]


def parse_args(argv=None):
    parser = common.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, choices=("triton", "torch", "auto"),
                        help="lasp_hf backend (default: triton on CUDA, torch with --cpu)")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on CUDA, float32 with --cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; 1 with --cpu)")
    parser.add_argument("--iters", type=int, default=None, help="steps per timed loop (default 10; 3 with --cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loops (median over them; default 3)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS,
                        help="rows to run (default: all); single is every efficiency's baseline")
    parser.add_argument("--layers", type=int, default=1,
                        help="layers per timed step, each layer's output the next one's queries, one backward call "
                        "through all (as in a model); every time is per layer")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time single / ring / allgather as replays of a CUDA graph of the whole step (what the "
                        "GPUs and the exchange take, without the host); lasp-ref stays eager")
    parser.add_argument("--decay", default="head", choices=("head", "channel"),
                        help="head: g [H] (default); channel: g [B, T, H, K], a decay per key channel (GLA)")
    parser.add_argument("--timeout-s", type=int, default=300, help="process-group timeout (a hung rank ends the run)")
    args = parser.parse_args(argv)
    for flag in ("iters", "repeats", "layers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    selected = CASES.select(args.cases)
    if args.dry_run:
        print("\n".join(f"{case.name} {case.params}" for case in selected))
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("sp_scaling.py: no CUDA device; pass --cpu (with --tiny) for a gloo smoke run", file=sys.stderr)
        return 2
    timeout = timedelta(seconds=args.timeout_s)
    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    try:
        import lasp_hf

        sp = lasp_hf.init_sequence_parallel(dist.get_world_size())
        lasp_missing = common.missing("lasp", device)
        if lasp_missing is None:  # it keeps its groups in module globals and sends to global ranks: W = world
            import lasp

            lasp.initialize_lasp(data_parallel_size=1, sequence_parallel_size=dist.get_world_size())
        run = Run(args, device, sp, lasp_missing)
        env = common.environment(device)
        rows = []
        for case in selected:
            rows += case(run, case.name)
        W = run.world_size
        name = (f"sp-{common.card_slug(env['card'])}-W{W}" + ("-tiny" if args.tiny else "")
                + ("-gla" if args.decay == "channel" else "")
                + (f"-L{run.layers}" if run.layers > 1 else "") + ("-graphs" if run.cuda_graphs else ""))
        if run.rank == 0:
            print(f"\nLASP scaling, W={W}, {run.dtype}, {env['card']}, backend {run.backend}"
                  + (", CUDA graph replays (lasp-ref eager)" if run.cuda_graphs else "")
                  + f"\n{common.format_table(rows, COLUMNS)}", flush=True)
            tolerance = TOLERANCE[run.dtype]
            path = common.write_results(
                name, env, rows, COLUMNS, args.out,
                extra={"world_size": W, "dtype": str(run.dtype), "backend": run.backend, "tolerance": tolerance,
                       "args": vars(args)},
                notes=[f"ms: fwd+bwd per layer; {run.iters} steps of {run.layers} layer(s) back to back after one "
                       f"barrier, slowest rank, median over {run.repeats} loops"
                       + ("; CUDA graph replays" if run.cuda_graphs else ""),
                       "host ms: the host's time to issue one layer's step; tok/s: W*T_local/ms (single: T_local/ms)",
                       "eff: single ms / ms; vs lasp: tok/s over lasp-ref's; comm MB/rank: sent per layer, fwd+bwd",
                       f"rel err: max over ranks of o, dq, dk, dv against the unsharded op; tolerance {tolerance:g}"])
            print(f"\nwrote {path}")
        return 1 if any(row["status"] in ("FAILED", "ERROR") for row in rows) else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        # A failing rank must not wait at exit on a process group the others are blocked in: leave at once, so
        # torchrun stops the others.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
