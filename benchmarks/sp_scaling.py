"""Sequence-parallel scaling (issue 4): forward+backward of one linear-attention layer split over W ranks.

    torchrun --standalone --nproc_per_node 4 benchmarks/sp_scaling.py          # NCCL, one GPU per rank
    torchrun --standalone --nproc_per_node 2 benchmarks/sp_scaling.py --cpu --tiny   # gloo smoke test
    torchrun ... benchmarks/sp_scaling.py --cases sp-T8K --timing pipelined --profile  # host-bound?

Every rank holds T local tokens of one sequence of W*T (B=1, H=16, K=V=128, bf16, scale 1.0,
g_h = -2^(-8(h+1)/H); with --decay channel, GLA's per-key-channel gates logsigmoid(x) / 16, g [B, T, H, K], which
then also get a gradient). Rows, all from one launch:
    single     lasp_hf.linear_attention on the rank's T tokens alone (the W=1 time at this local T)
    ring       linear_attention(..., sp_group=ctx, sp_mode="ring")       (LASP: the state hops)
    allgather  linear_attention(..., sp_group=ctx, sp_mode="allgather")  (LASP-2)
    lasp-ref   lasp.lasp_fuse_parallel, the LASP paper's code (GPU only)
Timing (--timing barrier|pipelined|both, default both):
    barrier    `ms`: a fixed number of iterations, each started on every rank right after a barrier;
               an iteration lasts until its slowest rank finishes (per-iteration max over ranks), and
               `ms` is the median over iterations. The host's launch latency is exposed every time.
    pipelined  `ms_pipe`: after ONE barrier, `iters` iterations back to back (the host runs ahead, as
               in training over layers); CUDA events around the whole loop, total / iters, max over
               ranks, median over --repeats such loops. `host ms`: the host's time to issue one iteration
               (the loop's first few, right after a synchronize); where it reaches `ms_pipe` the row measures
               the host, not the GPUs. `cpu ms`: the process's CPU time over the same calls (~host ms: the
               issuing is CPU work; less: the host waits; more: other threads burn CPU meanwhile).
    --cuda-graphs  single, ring and allgather each captured once (forward + backward) in a CUDA graph and timed
               as replays: the host issues ~nothing, so the rows measure the GPUs and the exchange (where an eager
               row is host-bound, the difference is the host's). Each such row also checks a replay's gradients
               against an eager step's (`graph_err`). lasp-ref stays eager.
tokens/s = W*T / ms; efficiency = single ms / ms, each method against the single time measured the
same way (`eff`, `eff_pipe`). --profile: afterwards, 3 iterations of every provider under
torch.profiler on rank 0 -> sp-<card>-W<n>-profile.txt (op tables sorted by self CPU and CUDA time).
--timeline: 3 pipelined iterations of single, ring and allgather with EVERY rank under torch.profiler ->
sp-<card>-W<n>-timeline.txt: per rank the GPU's busy and idle time, time inside NCCL kernels (which includes waiting
for a peer), host time per iteration, the longest idle gaps and the last iteration's kernels on one clock (is a rank
waiting for the host, for its neighbour, or computing?). Before timing, every SP
provider's o and dq, dk, dv on each rank are checked against the unsharded op run on the whole
sequence (bf16 tolerance 2e-2); a failing row is marked FAILED and gets no efficiency or ratio.
Writes benchmarks/results/sp-<card>-W<n>.json (+ .md) from rank 0.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import KI, Column

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
PROVIDERS = ("single", "ring", "allgather", "lasp-ref")

CASES = common.Registry()


@dataclass
class Run:
    device: torch.device
    dtype: torch.dtype
    backend: str
    tiny: bool
    rank: int
    world_size: int
    sp: object  # lasp_hf SequenceParallelContext
    lasp_ready: str | None  # None when the LASP reference can run, else why not
    warmup: int
    iters: int
    timing: str = "both"  # "barrier", "pipelined" or "both"
    repeats: int = 3  # pipelined loops per provider (median over them)
    seed: int = 0
    providers: tuple = PROVIDERS
    layers: int = 1  # layers per timed step (`layer_stack`); times are per layer
    cuda_graphs: bool = False  # time single / ring / allgather as CUDA graph replays (`cuda_graphed`)
    decay: str = "head"  # "head": g [H]; "channel": g [B, T, H, K] (GLA)

    def shape(self, B: int, T: int, H: int, D: int) -> tuple[int, int, int, int]:
        if not self.tiny:
            return B, T, H, D
        return B, min(T // 128 + 1, 131), min(H, 2), 16


def slopes(H: int) -> torch.Tensor:
    """TransNormerLLM / lightning-attention decay rates per head (positive): 2^(-8(h+1)/H)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32)


def comm_bytes(provider: str, W: int, B: int, H: int, K: int, V: int) -> dict:
    """Bytes sent per layer, forward + backward: by the busiest rank, and over all ranks.

    ring / lasp-ref: one float32 state [B, H, K, V] per hop forward (r -> r+1) and one state
    gradient per hop backward (r+1 -> r). allgather: all_gather of (state, decay [B, H]) forward
    and its adjoint reduce_scatter backward; each sends (W-1) entries per rank (ring algorithm).
    """
    state = B * H * K * V * 4
    if provider == "single" or W == 1:
        return {"per_rank": 0, "total": 0}
    if provider in ("ring", "lasp-ref"):
        return {"per_rank": 2 * state if W > 2 else state, "total": 2 * (W - 1) * state}
    entry = state + B * H * 4
    return {"per_rank": 2 * (W - 1) * entry, "total": 2 * W * (W - 1) * entry}


# ----------------------------------------------------------------------------- timing across ranks


def time_across_ranks(run: Run, step: Callable[[], object]) -> dict:
    """Run `step` warmup + iters times, each after a barrier; return the median over iterations
    of the slowest rank's time, and every rank's own median (ms)."""
    cuda = run.device.type == "cuda"
    times = []
    for i in range(run.warmup + run.iters):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(run.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            step()
            elapsed = (time.perf_counter() - begin) * 1e3
        if i >= run.warmup:
            times.append(elapsed)
    mine = torch.tensor(times, dtype=torch.float64, device=run.device)
    every = [torch.empty_like(mine) for _ in range(run.world_size)]
    dist.all_gather(every, mine)
    every = torch.stack(every).cpu()  # [W, iters]
    return {"ms": float(every.max(dim=0).values.median()), "rank_ms": [float(row.median()) for row in every]}


HOST_PROBE_ITERS = 4  # iterations whose issuing is timed on the host right after a synchronize (see time_pipelined)


def time_pipelined(run: Run, step: Callable[[], object]) -> dict:
    """Run `step` warmup times, then `repeats` loops of `iters` back-to-back calls, each loop after
    ONE barrier and timed as a whole; return the median over loops of the slowest rank's
    loop time / iters, and every rank's own median (ms). Counts are the same on every rank.

    Also `host_ms`: the host's time to issue one call, from the loop's first HOST_PROBE_ITERS calls (issued right
    after a synchronize, so the launch queue cannot fill and block them; on CPU the whole call), slowest rank's
    median. A row whose host_ms reaches its ms is bound by the host, not the GPUs. And `cpu_ms`: the process's CPU
    time (every thread) over the same calls: about host_ms where issuing is CPU work, less where the host waits
    (for a lock, the driver, a peer), more where other threads (NCCL's, the process group's) burn CPU meanwhile."""
    cuda = run.device.type == "cuda"
    for _ in range(run.warmup):
        step()
    totals, host, cpu = [], [], []
    probe = min(HOST_PROBE_ITERS, run.iters)
    for _ in range(run.repeats):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(run.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            begin, begin_cpu = time.perf_counter(), time.process_time()
            for i in range(run.iters):
                step()
                if i + 1 == probe:
                    host.append((time.perf_counter() - begin) * 1e3 / probe)
                    cpu.append((time.process_time() - begin_cpu) * 1e3 / probe)
            end.record()
            end.synchronize()
            totals.append(start.elapsed_time(end) / run.iters)
        else:
            begin, begin_cpu = time.perf_counter(), time.process_time()
            for _ in range(run.iters):
                step()
            totals.append((time.perf_counter() - begin) * 1e3 / run.iters)
            host.append(totals[-1])
            cpu.append((time.process_time() - begin_cpu) * 1e3 / run.iters)
    mine = torch.tensor([totals, host, cpu], dtype=torch.float64, device=run.device)
    every = [torch.empty_like(mine) for _ in range(run.world_size)]
    dist.all_gather(every, mine)
    every = torch.stack(every).cpu()  # [W, 3, repeats]
    return {"ms": float(every[:, 0].max(dim=0).values.median()),
            "rank_ms": [float(row.median()) for row in every[:, 0]],
            "host_ms": float(every[:, 1].max(dim=0).values.median()),
            "cpu_ms": float(every[:, 2].max(dim=0).values.median())}


def all_ranks_max(run: Run, value: float) -> float:
    x = torch.tensor([value], dtype=torch.float64, device=run.device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x.item())


# ----------------------------------------------------------------------------- providers


def _leaves(*tensors):
    return [x.detach().clone().requires_grad_() for x in tensors]


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def prepare(run: Run, provider: str, q, k, v, g, do):
    """(forward, leaves, do, to_bthd) for one provider on this rank's slice. forward(q, k, v) runs one layer on the
    given inputs (default: the leaves), each in the provider's layout."""
    import lasp_hf

    if provider in ("single", "ring", "allgather"):
        lq, lk, lv = _leaves(q, k, v)
        sp_args = {} if provider == "single" else {"sp_group": run.sp, "sp_mode": provider}

        def forward(q=lq, k=lk, v=lv):
            return lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend=run.backend, **sp_args)[0]

        return forward, [lq, lk, lv], do, lambda t: t
    if provider == "lasp-ref":
        from lasp import lasp_fuse_parallel

        lq, lk, lv = _leaves(_bhtd(q), _bhtd(k), _bhtd(v))
        B, H, _, K = lq.shape
        s = (-g).view(-1, 1, 1).contiguous()
        kv = torch.zeros(B, H, K, lv.shape[-1], dtype=torch.float32, device=q.device)
        dkv = torch.zeros_like(kv)

        def forward(q=lq, k=lk, v=lv):
            if run.layers == 1:
                return lasp_fuse_parallel(q, k, v, s, kv, dkv)
            # It writes its state buffers in place (saved for its backward): one pair per layer, as in a model.
            return lasp_fuse_parallel(q, k, v, s, torch.zeros_like(kv), torch.zeros_like(dkv))

        return forward, [lq, lk, lv], _bhtd(do), lambda t: t.transpose(1, 2)
    raise ValueError(f"unknown provider {provider!r}")


def layer_stack(forward, leaves: list, upstream, layers: int):
    """A step of `layers` layers as in a model: layer l > 0 takes layer l-1's output as its queries (so no rank runs
    ahead into the next layer before its exchange is done) and its own k, v leaves; ONE backward call through all
    of them (the autograd engine's fixed cost per backward call is shared, as in training)."""
    own = [_leaves(leaves[1], leaves[2]) for _ in range(layers - 1)]
    every = leaves + [x for pair in own for x in pair]

    def step():
        o = forward()
        for k, v in own:
            o = forward(o, k, v)
        return torch.autograd.grad(o, every, upstream)

    return step


def cuda_graphed(run: Run, step):
    """`step` (forward + backward) captured once in a CUDA graph: (replay, the largest relative error of a replay's
    gradients against an eager step's). The graph holds every kernel and NCCL call of the step, so a replay costs
    the host ~10 us instead of the eager step's launches: with both the single-GPU row and the SP rows replayed,
    their ratio measures the GPUs' work and the exchange, not how fast this host issues them. Needs the SP
    exchanges on the SP context's own NCCL communicator (the default on NCCL; the process group's
    point-to-point calls are not captured here)."""
    eager = [x.clone() for x in step()]
    side = torch.cuda.Stream(run.device)
    side.wait_stream(torch.cuda.current_stream(run.device))
    with torch.cuda.stream(side):  # (warm-up on a side stream, as torch.cuda.graph asks)
        for _ in range(2):
            step()
    torch.cuda.current_stream(run.device).wait_stream(side)
    torch.cuda.synchronize(run.device)
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    # thread_local: the process group's watchdog thread may query CUDA events while this thread captures.
    # (LASP_HF_BENCH_CAPTURE_MODE=global|relaxed: another mode, to find which call breaks a capture.)
    mode = os.environ.get("LASP_HF_BENCH_CAPTURE_MODE", "thread_local")
    with torch.cuda.graph(graph, capture_error_mode=mode):
        outputs = step()
    torch.cuda.synchronize(run.device)
    dist.barrier()
    graph.replay()
    torch.cuda.synchronize(run.device)
    err = max(common.relative_error(got, ref) for got, ref in zip(outputs, eager))
    return graph.replay, err


# ----------------------------------------------------------------------------- the case


@CASES.case("sp", dict(T=8 * KI), dict(T=32 * KI), dict(T=128 * KI))
def sp_case(run: Run, name: str, T: int) -> list[dict]:
    """All providers at local length T: check against the unsharded op, then time fwd+bwd."""
    import lasp_hf

    B, T, H, D = run.shape(1, T, 16, 128)
    W, r = run.world_size, run.rank
    shape = dict(W=W, B=B, T_local=T, T_total=W * T, H=H, K=D, V=D)
    # The same full sequence on every rank (same seed); this rank keeps tokens [r*T, (r+1)*T).
    gen = torch.Generator(device=run.device).manual_seed(run.seed)
    full = [torch.randn(B, W * T, H, D, device=run.device, dtype=run.dtype, generator=gen) for _ in range(4)]
    cut = slice(r * T, (r + 1) * T)
    if run.decay == "channel":
        g = F.logsigmoid(torch.randn(B, W * T, H, D, device=run.device, generator=gen)) / 16
    else:
        g = -slopes(H).to(run.device)
    leaves = _leaves(*full[:3])
    o_full = lasp_hf.linear_attention(*leaves, g, scale=1.0, backend=run.backend)[0]
    grads = torch.autograd.grad(o_full, leaves, full[3])
    if run.decay == "channel":  # this rank's slice, with a gradient as in a GLA layer (dg is computed and timed)
        g = g[:, cut].detach().clone().requires_grad_()
    ref = {name_: x[:, cut].detach().clone() for name_, x in zip(("o", "dq", "dk", "dv"), (o_full,) + grads)}
    q, k, v, do = (x[:, cut].contiguous() for x in full)
    del full, leaves, o_full, grads
    _free(run.device)

    rows = []
    for provider in run.providers:
        row = {"case": name, "provider": provider, **shape}
        nbytes = comm_bytes(provider, W, B, H, D, D)
        row.update(comm_mb_per_rank=nbytes["per_rank"] / 2**20, comm_mb_total=nbytes["total"] / 2**20)
        if provider == "lasp-ref" and (run.lasp_ready or run.decay == "channel"):
            rows.append({**row, "status": "SKIP", "note": run.lasp_ready or "no decay per key channel"})
            continue
        rows.append(_check_and_time(run, provider, row, (q, k, v, g, do), ref))
        _free(run.device)  # what the provider allocated is garbage once it returns
    _add_ratios(rows)
    return rows


def _check_and_time(run: Run, provider: str, row: dict, inputs: tuple, ref: dict) -> dict:
    """Check one provider on every rank against the unsharded run, then time its fwd+bwd."""
    failure, errors = None, {}
    try:
        forward, leaves, upstream, to_bthd = prepare(run, provider, *inputs)
        o = forward()
        grads = torch.autograd.grad(o, leaves, upstream)
        errors = {
            n: common.relative_error(to_bthd(x), ref[n]) for n, x in zip(("o", "dq", "dk", "dv"), (o, *grads))
        }
        # The leaves' AccumulateGrad nodes live as long as this autograd graph, on the stream they were made on
        # (the default one); kept alive, a CUDA graph capture of the step would make its backward join the
        # default stream ("operation would make the legacy stream depend on a capturing blocking stream").
        del o, grads
    except Exception as err:  # noqa: BLE001 - reported in the row, the other providers still run
        traceback.print_exc()
        failure = f"{type(err).__name__}: {err}".splitlines()[0][:160]
    # Every rank must agree on what happens next, or the collectives below would hang.
    if all_ranks_max(run, 1.0 if failure else 0.0) > 0:
        return {**row, "status": "ERROR", "note": failure or "failed on another rank"}
    if provider == "single":
        # Only rank 0's o and dq are those of the whole sequence: the other ranks lack the
        # carried state, and dk, dv also depend on the queries after the cut.
        err = all_ranks_max(run, max(errors["o"], errors["dq"]) if run.rank == 0 else 0.0)
        row["note"] = "checked: rank 0's o and dq; no communication"
    else:
        err = all_ranks_max(run, max(errors.values()))
    row.update(err=err, status="ok" if err <= TOLERANCE[run.dtype] else "FAILED")

    step = layer_stack(forward, leaves, upstream, run.layers)  # (one layer: forward, then its backward)
    if run.cuda_graphs and provider != "lasp-ref" and run.device.type == "cuda":
        failure, graph_err = None, 0.0
        try:
            step, graph_err = cuda_graphed(run, step)
        except Exception as err:  # noqa: BLE001 - reported in the row
            traceback.print_exc()
            failure = f"CUDA graph: {type(err).__name__}: {err}".splitlines()[0][:160]
        if all_ranks_max(run, 1.0 if failure else 0.0) > 0:
            return {**row, "status": "ERROR", "note": failure or "CUDA graph failed on another rank"}
        graph_err = all_ranks_max(run, graph_err)
        row.update(cuda_graph=True, graph_err=graph_err)
        if graph_err > TOLERANCE[run.dtype]:
            row["status"] = "FAILED"

    tokens = row["B"] * row["T_local"] * (1 if provider == "single" else run.world_size)
    per = 1.0 / run.layers  # every time below is per layer
    row["layers"] = run.layers
    if run.timing in ("barrier", "both"):
        timing = time_across_ranks(run, step)
        ms = timing["ms"] * per
        row.update(ms=ms, rank_ms=[x * per for x in timing["rank_ms"]], tokens_per_s=tokens / (ms * 1e-3))
    if run.timing in ("pipelined", "both"):
        timing = time_pipelined(run, step)
        ms = timing["ms"] * per
        row.update(
            ms_pipe=ms,
            rank_ms_pipe=[x * per for x in timing["rank_ms"]],
            host_ms_pipe=timing["host_ms"] * per,
            cpu_ms_pipe=timing["cpu_ms"] * per,
            tokens_per_s_pipe=tokens / (ms * 1e-3),
        )
    return row


# (time key, tokens/s key, efficiency key, vs-lasp key) of each timing method
METHODS = (
    ("ms", "tokens_per_s", "efficiency", "vs_lasp"),
    ("ms_pipe", "tokens_per_s_pipe", "efficiency_pipe", "vs_lasp_pipe"),
)


def _add_ratios(rows: list[dict]) -> None:
    """efficiency = single ms / ms at the same local T; vs_lasp = tokens/s over lasp-ref's; for
    each timing method against the same method's times. Only between rows whose checks passed."""
    by_provider = {row["provider"]: row for row in rows if row.get("status") == "ok"}
    single, lasp_ref = by_provider.get("single"), by_provider.get("lasp-ref")
    for row in rows:
        if row.get("status") != "ok" or row["provider"] == "single":
            continue
        for ms, tps, eff, vs in METHODS:
            if ms not in row:
                continue
            if single and ms in single:
                row[eff] = single[ms] / row[ms]
            if lasp_ref and tps in lasp_ref and row["provider"] != "lasp-ref":
                row[vs] = row[tps] / lasp_ref[tps]


# ----------------------------------------------------------------------------- profile

PROFILE_ITERS = 3  # iterations under the profiler, per provider and case
PROFILE_ROWS = 25  # rows of each op table in the file
PROFILE_PRINT_ROWS = 10  # rows printed per provider
PROFILE_MAX_BYTES = 1_000_000  # the file is cut there
TIMELINE_ITERS = 3  # pipelined iterations under the profiler on every rank, per provider
TIMELINE_GAPS = 8  # longest idle gaps listed per rank


def _device_time(event) -> float:
    """Self CUDA time (us) of a profiler row, whatever this torch calls it."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def _profile_tables(prof, cuda: bool) -> str:
    """The op table sorted by self CPU time and, on CUDA, by self CUDA time."""
    averages = prof.key_averages()
    parts = [averages.table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS, max_name_column_width=70)]
    if cuda:
        try:
            key = "self_device_time_total"
            parts.append(averages.table(sort_by=key, row_limit=PROFILE_ROWS, max_name_column_width=70))
        except Exception:  # noqa: BLE001 - older torch spells the same key this way
            key = "self_cuda_time_total"
            parts.append(averages.table(sort_by=key, row_limit=PROFILE_ROWS, max_name_column_width=70))
    return "\n".join(parts)


def _profile_top(prof, iters: int, cuda: bool) -> list[str]:
    """The PROFILE_PRINT_ROWS rows of most self CPU time, one short line each, per iteration."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    cpu = sum(e.self_cpu_time_total for e in events) / iters / 1e3
    total = f"    per iteration: self CPU {cpu:.3f} ms"
    if cuda:
        total += f", self CUDA {sum(_device_time(e) for e in events) / iters / 1e3:.3f} ms"
    lines = [total + " (sums over ops)"]
    for e in events[:PROFILE_PRINT_ROWS]:
        line = f"    {e.key[:56]:56} cpu {e.self_cpu_time_total / iters / 1e3:8.3f} ms"
        if cuda:
            line += f"  cuda {_device_time(e) / iters / 1e3:8.3f} ms"
        lines.append(line + f"  calls/it {e.count / iters:g}")
    return lines


def profile_case(run: Run, name: str, T: int, rows: list[dict]) -> list[tuple[str, str, list[str]]]:
    """PROFILE_ITERS fwd+bwd iterations of every provider that ran at this case (status ok or
    FAILED: the same on every rank), all ranks stepping, rank 0 under torch.profiler. Returns
    rank 0's (title, tables, top lines) per provider; [] on the other ranks."""
    from torch.profiler import ProfilerActivity, profile

    cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    B, T, H, D = run.shape(1, T, 16, 128)
    gen = torch.Generator(device=run.device).manual_seed(run.seed + 1)
    q, k, v, do = (
        torch.randn(B, T, H, D, device=run.device, dtype=run.dtype, generator=gen) for _ in range(4)
    )
    g = -slopes(H).to(run.device)
    sections = []
    for row in rows:
        if row["case"] != name or row.get("status") not in ("ok", "FAILED"):
            continue
        forward, leaves, upstream, _ = prepare(run, row["provider"], q, k, v, g, do)
        step = layer_stack(forward, leaves, upstream, 1)
        step()  # one untimed call: first-call costs are not what the profile is for
        dist.barrier()
        prof, title = None, f"{name} {row['provider']} (W={run.world_size}, {PROFILE_ITERS} iterations)"
        if run.rank == 0:
            try:
                prof = profile(activities=activities)
                prof.start()
            except Exception as err:  # noqa: BLE001 - the steps must still run: the others wait on them
                prof, failure = None, f"profiler failed to start: {type(err).__name__}: {err}"
        for _ in range(PROFILE_ITERS):
            step()
        if cuda:
            torch.cuda.synchronize(run.device)
        if run.rank == 0:
            if prof is not None:
                try:
                    prof.stop()
                    sections.append(
                        (title, _profile_tables(prof, cuda), _profile_top(prof, PROFILE_ITERS, cuda))
                    )
                except Exception as err:  # noqa: BLE001
                    sections.append((title, f"profiler failed: {type(err).__name__}: {err}", []))
            else:
                sections.append((title, failure, []))
        del forward, leaves, upstream, step, prof
        _free(run.device)
    return sections


def _device_intervals(prof, cuda: bool) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of every GPU activity (kernels, copies, memsets), or of every ATen op on CPU, sorted
    by start. Kineto's timestamps are on the host's clock, so the ranks of one machine share them."""
    wanted = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    out = []
    for event in prof.profiler.kineto_results.events():
        if event.device_type() != wanted or (not cuda and not event.name().startswith("aten::")):
            continue
        out.append((event.name(), event.start_ns(), event.start_ns() + event.duration_ns()))
    return sorted(out, key=lambda item: item[1])


def _timeline_summary(intervals: list[tuple[str, int, int]], host_ns: list[int]) -> dict:
    """Busy (union of intervals), idle (span - busy), NCCL and the longest gaps of one rank's window, in us."""
    busy = nccl = 0
    gaps = []
    end = None
    for i, (name, start, stop) in enumerate(intervals):
        if "nccl" in name.lower():
            nccl += stop - start
        if end is None:
            busy += stop - start
        else:
            if start > end:
                gaps.append((start - end, intervals[i - 1][0], name))
            busy += max(0, stop - max(start, end))
        end = stop if end is None else max(end, stop)
    span = (intervals[-1][2] - intervals[0][1]) if intervals else 0
    gaps.sort(reverse=True)
    return {"span_us": span / 1e3, "busy_us": busy / 1e3, "idle_us": (span - busy) / 1e3, "nccl_us": nccl / 1e3,
            "host_us_per_iter": sum(host_ns) / max(len(host_ns), 1) / 1e3,
            "gaps": [(gap / 1e3, before, after) for gap, before, after in gaps[:TIMELINE_GAPS]]}


def timeline_case(run: Run, name: str, T: int, rows: list[dict]) -> list[str]:
    """TIMELINE_ITERS pipelined fwd+bwd iterations of single, ring and allgather with every rank under the profiler;
    returns rank 0's text (every rank's summary and last iteration), [] on the other ranks."""
    from torch.profiler import ProfilerActivity, profile

    cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    B, T, H, D = run.shape(1, T, 16, 128)
    gen = torch.Generator(device=run.device).manual_seed(run.seed + 2)
    q, k, v, do = (torch.randn(B, T, H, D, device=run.device, dtype=run.dtype, generator=gen) for _ in range(4))
    g = -slopes(H).to(run.device)
    lines = []
    for row in rows:
        if row["case"] != name or row["provider"] == "lasp-ref" or row.get("status") != "ok":
            continue
        forward, leaves, upstream, _ = prepare(run, row["provider"], q, k, v, g, do)
        step = layer_stack(forward, leaves, upstream, 1)
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize(run.device)
        dist.barrier()
        host_ns, marks = [], []
        with profile(activities=activities) as prof:
            for _ in range(TIMELINE_ITERS):
                marks.append(time.time_ns())
                t0 = time.perf_counter_ns()
                step()
                host_ns.append(time.perf_counter_ns() - t0)
            if cuda:
                torch.cuda.synchronize(run.device)
        mine = {"rank": run.rank, "intervals": _device_intervals(prof, cuda), "host_ns": host_ns, "marks": marks}
        everyone = [None] * run.world_size
        dist.all_gather_object(everyone, mine)
        del forward, leaves, upstream, step, prof
        _free(run.device)
        if run.rank != 0:
            continue
        t0 = min((r["intervals"][0][1] for r in everyone if r["intervals"]), default=0)
        lines.append(f"===== {name} {row['provider']} (W={run.world_size}): {TIMELINE_ITERS} pipelined iterations, "
                     f"every rank profiled; us")
        lines.append("rank  span  busy  idle  in-nccl  host/iter")
        for r in everyone:
            summary = _timeline_summary(r["intervals"], r["host_ns"])
            numbers = (summary[key] for key in ("span_us", "busy_us", "idle_us", "nccl_us", "host_us_per_iter"))
            lines.append(f"{r['rank']:>4}  " + "  ".join(f"{x:.0f}" for x in numbers))
        for r in everyone:
            lines.append(f"-- rank {r['rank']}: longest idle gaps (us, after -> before)")
            for gap, before, after in _timeline_summary(r["intervals"], r["host_ns"])["gaps"]:
                lines.append(f"   {gap:8.1f}  {before[:48]} -> {after[:48]}")
        for r in everyone:
            last = r["marks"][-1]
            lines.append(f"-- rank {r['rank']}: last iteration (host started it at {(last - t0) / 1e3:.1f}); start, "
                         "duration, kernel")
            for kernel, start, stop in r["intervals"]:
                if stop >= last:
                    lines.append(f"   {(start - t0) / 1e3:9.1f} {(stop - start) / 1e3:8.1f}  {kernel[:90]}")
    return lines


def write_profile(path: Path, sections: list[tuple[str, str, list[str]]], header: str) -> Path:
    """One text file for every provider and case, cut at PROFILE_MAX_BYTES."""
    text = header + "\n\n" + "\n\n".join(f"===== {title}\n{tables}" for title, tables, _ in sections) + "\n"
    data = text.encode()
    if len(data) > PROFILE_MAX_BYTES:
        data = data[: PROFILE_MAX_BYTES - 40] + b"\n[cut at the size limit]\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main

COLUMNS = [
    Column("case", "case"),
    Column("W", "W"),
    Column("provider", "provider"),
    Column("ms", "ms", "{:.3f}"),
    Column("ms_pipe", "ms_pipe", "{:.3f}"),
    Column("host_ms_pipe", "host ms", "{:.3f}"),
    Column("cpu_ms_pipe", "cpu ms", "{:.3f}"),
    Column("tokens_per_s", "tok/s", "{:.3e}"),
    Column("efficiency", "eff", "{:.2f}"),
    Column("efficiency_pipe", "eff_pipe", "{:.2f}"),
    Column("vs_lasp", "vs lasp", "{:.1f}x"),
    Column("vs_lasp_pipe", "vs lasp pipe", "{:.1f}x"),
    Column("comm_mb_per_rank", "comm MB/rank", "{:.3g}"),
    Column("err", "rel err", "{:.2e}"),
    Column("status", "status"),
]


def parse_args(argv=None):
    parser = common.common_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        default=None,
        choices=("triton", "torch", "auto"),
        help="lasp_hf backend (default: triton on CUDA, torch with --cpu)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="default: bfloat16 on CUDA, float32 with --cpu",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed iterations (default 3; 1 with --cpu)"
    )
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 10; 3 with --cpu)")
    parser.add_argument(
        "--timing",
        default="both",
        choices=("barrier", "pipelined", "both"),
        help="barrier: each iteration after a barrier (ms); pipelined: iterations back to back "
        "after one barrier (ms_pipe); both (default)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="pipelined loops of --iters iterations (median; default 3)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, 3 iterations of every provider under torch.profiler (rank 0) -> "
        "<out>/sp-<card>-W<n>-profile.txt, and the top rows printed",
    )
    parser.add_argument(
        "--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS,
        help="rows to run (default: all); single is every efficiency's baseline",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="after timing, 3 iterations of single / ring / allgather with every rank under torch.profiler -> "
        "<out>/sp-<card>-W<n>-timeline.txt (GPU busy / idle / NCCL time per rank, longest gaps, last iteration)",
    )
    parser.add_argument(
        "--layers", type=int, default=1,
        help="layers per timed step, as in a model: each layer's output is the next one's queries, one backward "
        "call through all (default 1: a backward call per op call); every time is per layer",
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true",
        help="time single / ring / allgather as replays of a CUDA graph of the whole step (the host then issues "
        "~nothing: what the GPUs and the exchange take); lasp-ref stays eager; each row also checks a replay's "
        "gradients against an eager step's (graph_err)",
    )
    parser.add_argument(
        "--decay", default="head", choices=("head", "channel"),
        help="head: g [H] (default); channel: g [B, T, H, K], a decay per key channel (GLA)",
    )
    parser.add_argument(
        "--timeout-s", type=int, default=300, help="process-group timeout (a hung rank ends the run)"
    )
    args = parser.parse_args(argv)
    for flag in ("iters", "repeats", "layers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    return args


def _lasp_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the LASP reference needs CUDA"
    try:
        import lasp  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"lasp unavailable ({type(err).__name__}: {err})"[:160]
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    selected = CASES.select(args.cases)
    if args.dry_run:
        for case in selected:
            print(case.name, case.params)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("sp_scaling.py: no CUDA device; pass --cpu (with --tiny) for a gloo smoke run", file=sys.stderr)
        return 2
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    common.pin_cpus_from_env()  # (benchmark A/Bs of host contention: LASP_HF_BENCH_PIN=1)
    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timedelta(seconds=args.timeout_s), device_id=device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        import lasp_hf

        sp = lasp_hf.init_sequence_parallel(world_size)
        lasp_ready = _lasp_unavailable(device)
        if lasp_ready is None:
            # The reference keeps its groups in module globals and sends to global ranks: W = world.
            import lasp

            lasp.initialize_lasp(data_parallel_size=1, sequence_parallel_size=world_size)
        run = Run(
            device,
            getattr(torch, args.dtype or ("float32" if args.cpu else "bfloat16")),
            args.backend or ("torch" if args.cpu else "triton"),
            args.tiny,
            rank,
            world_size,
            sp,
            lasp_ready,
            args.warmup if args.warmup is not None else (1 if args.cpu else 3),
            args.iters if args.iters is not None else (3 if args.cpu else 10),
            args.timing,
            args.repeats,
            providers=tuple(p for p in PROVIDERS if p in args.providers),
            layers=args.layers,
            cuda_graphs=args.cuda_graphs and device.type == "cuda",
            decay=args.decay,
        )
        env = common.environment(device)
        rows = []
        for case in selected:
            if rank == 0:
                print(f"[sp W={world_size}] {case.name}", file=sys.stderr, flush=True)
            rows += case(run, case.name)
        if rank == 0:
            title = (f"LASP scaling, W={world_size}, {run.dtype}, {env['card']}, backend {run.backend}"
                     + (", CUDA graph replays (lasp-ref eager)" if run.cuda_graphs else ""))
            common.print_table(title, rows, COLUMNS)
            for row in rows:
                if row["status"] != "ok":
                    print(f"  {row['case']} {row['provider']}: {row['status']} {row.get('note', '')}")
            name = (f"sp-{common.card_slug(env['card'])}-W{world_size}" + ("-tiny" if args.tiny else "")
                    + ("-gla" if args.decay == "channel" else "")
                    + (f"-L{run.layers}" if run.layers > 1 else "") + ("-graphs" if run.cuda_graphs else ""))
            path = common.write_results(
                name,
                env,
                rows,
                COLUMNS,
                args.out,
                extra={
                    "world_size": world_size,
                    "dtype": str(run.dtype),
                    "backend": run.backend,
                    "tolerance": TOLERANCE[run.dtype],
                    "args": vars(args),
                },
                notes=[
                    (
                        "ms: fwd+bwd of one layer, median over iterations of the slowest rank "
                        "(each iteration starts after a barrier)"
                    ),
                    (
                        f"ms_pipe: {run.iters} iterations back to back after one barrier, total / "
                        f"iterations, slowest rank, median over {run.repeats} such loops"
                    ),
                    (
                        "tok/s: W*T_local/ms (single: one rank's T_local/ms); eff: single ms / ms; "
                        "eff_pipe: the same with ms_pipe"
                    ),
                    "vs lasp: tok/s over lasp-ref's at the same W and T_local",
                    "comm MB/rank: bytes the busiest rank sends per layer, fwd+bwd",
                    (
                        f"layers: {run.layers} layer(s) per step, each taking the previous one's output as queries, and "
                        "one backward call through them (as in a model); every ms and host ms is per layer"
                    ),
                    (
                        "rel err: max over ranks of o, dq, dk, dv against the unsharded op on the whole "
                        f"sequence; tolerance {TOLERANCE[run.dtype]:g}"
                    ),
                ],
            )
            print(f"\nwrote {path}")
        out_dir = Path(args.out) if args.out is not None else common.RESULTS_DIR
        if args.profile:
            sections = []
            for case in selected:
                if rank == 0:
                    print(f"[sp W={world_size}] profiling {case.name}", file=sys.stderr, flush=True)
                sections += profile_case(run, case.name, case.params["T"], rows)
            if rank == 0:
                for title, _, top in sections:
                    print(f"\nprofile {title}, top {PROFILE_PRINT_ROWS} by self CPU time:")
                    print("\n".join(top))
                header = f"{name}: torch.profiler, rank 0; {common.describe_env(env)}"
                path = write_profile(out_dir / f"{name}-profile.txt", sections, header)
                print(f"wrote {path}", flush=True)
        if args.timeline:
            lines = []
            for case in selected:
                if rank == 0:
                    print(f"[sp W={world_size}] timeline {case.name}", file=sys.stderr, flush=True)
                lines += timeline_case(run, case.name, case.params["T"], rows)
            if rank == 0:
                path = write_profile(out_dir / f"{name}-timeline.txt", [("timeline", "\n".join(lines), [])],
                                     f"{name}: every rank under torch.profiler; {common.describe_env(env)}")
                print("\n".join(lines[:40]))
                print(f"wrote {path}", flush=True)
        bad = any(row["status"] in ("FAILED", "ERROR") for row in rows)
        return 1 if bad else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        # A rank that fails must not wait at exit on the process group the others are blocked in (torchrun would
        # then keep every rank until its time limit): report and leave at once, so torchrun stops the others.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
