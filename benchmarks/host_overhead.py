"""Host (CPU) time of one forward+backward of the op: is a small or medium T host-bound?

    python benchmarks/host_overhead.py                                   # one GPU: single op
    torchrun --standalone --nproc_per_node 4 benchmarks/host_overhead.py  # also ring and allgather

For each provider and T: `host_us` (Python time per fwd+bwd call, no synchronisation, averaged over a
loop that the GPU cannot keep up with only if the GPU is slower), `gpu_us` (CUDA events around the same
loop: max(host, GPU) per call when host-bound) and the top functions of a cProfile of the loop (rank 0),
sorted by own time. Writes benchmarks/results/host-overhead-<card>-W<n>.txt from rank 0.

--breakdown: instead of cProfile (which inflates Python calls several times), wall-clock accumulators
around every Triton kernel launch (per kernel), the torch.distributed calls, and torch.profiler's count of
ATen ops per call: where the host's microseconds go, without the profiler's distortion of the totals.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import itertools
import os
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402 - also turns NCCL multicast off (NO_MULTICAST_ENV)


class _Timed:
    """Wraps `owner.name` with a wall-clock accumulator (per label) until `restore`."""

    def __init__(self, totals: dict):
        self.totals, self.undo = totals, []

    def wrap(self, owner, name: str, label=None):
        original = getattr(owner, name)
        stored = inspect.getattr_static(owner, name)  # what `restore` puts back (a staticmethod stays one)
        totals = self.totals

        def timed(*a, **kw):
            key = label(a) if label is not None else name
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                slot = totals.setdefault(key, [0, 0.0])
                slot[0] += 1
                slot[1] += time.perf_counter() - t0

        setattr(owner, name, timed)
        self.undo.append((owner, name, stored))

    def restore(self):
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)
        self.undo.clear()


# Functions of the SP layer timed by --breakdown (module, or module.Class; names), besides the launches.
SP_STEPS = (
    ("lasp", ("_rank_decay", "_carried_state_grad", "_local_initial_state", "_check_across_ranks", "_rank_plan")),
    ("lasp._LaspFunction", ("forward", "backward")),
    ("comm", ("ring_forward", "ring_backward", "allgather_forward", "allgather_backward", "post_recv_from_prev",
              "post_recv_from_next", "wait_sends", "_isend", "_irecv", "_received", "_combine",
              "all_gather_stacked", "_gather_states", "_send_later")),
    ("comm.SideStream", ("__enter__", "__exit__", "join")),
    ("nccl.DirectComm", ("send", "recv", "all_gather")),
    ("chunk", ("local_forward", "local_backward", "fold_segments", "chunk_linear_attention_fwd",
               "chunk_linear_attention_bwd", "_launch_segment_state", "_launch_segment_dstate", "_launch_fwd",
               "_launch_bwd")),
    ("chunk.SegmentReuse", ("final_state", "prepare_states", "prepare_dstates", "initial_state_grad")),
)


def every_rank(text: str, world: int) -> list[str]:
    """Each rank's `text`, labelled with its rank, on every rank (just [text] without torch.distributed)."""
    if world == 1:
        return [text]
    texts = [None] * world
    dist.all_gather_object(texts, text)
    return [f"  -- rank {r}\n{t}" for r, t in enumerate(texts)]


def calibration(device, iters: int = 200) -> str:
    """Host microseconds of a few basic calls on this machine (how fast is this host?)."""
    x = torch.ones(16, device=device, requires_grad=True)

    class Nothing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, da):
            return da

    cases = {
        "torch.empty(16) on the GPU": lambda: torch.empty(16, device=device),
        "x + 1 (16 elements)": lambda: x.detach() + 1,
        "Function.apply + autograd.grad (view; no kernel)": lambda: torch.autograd.grad(Nothing.apply(x), x,
                                                                                          torch.ones_like(x)),
        "Python loop of 1000 additions": lambda: sum(range(1000)),
    }
    out = []
    for name, fn in cases.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append(f"  calibration: {name:<50} {(time.perf_counter() - t0) / iters * 1e6:8.1f} us")
        torch.cuda.synchronize()
    return "\n".join(out)


def breakdown(step, iters: int) -> str:
    """Per call of `step`: host microseconds in each Triton kernel's launches, in torch.distributed calls,
    and the number of ATen ops (torch.profiler, CPU only, a separate loop)."""
    import triton.runtime.jit as jit

    totals: dict = {}
    timed = _Timed(totals)
    from lasp_hf.kernels.triton import launch

    timed.wrap(launch.FastLaunch, "launch", label=lambda a: "launch " + a[0].__name__)
    # Triton's own path: inside `launch` on a cache miss (so not added to the total again), or direct.
    timed.wrap(jit.JITFunction, "run", label=lambda a: "(triton run) " + getattr(a[0], "__name__", "?"))
    for name in ("isend", "irecv", "all_gather_into_tensor", "all_reduce", "barrier"):
        if hasattr(dist, name):
            timed.wrap(dist, name, label=lambda a, name=name: "dist." + name)
    # The sequence-parallel layer's own steps (inclusive times: nested entries are also inside their callers').
    from lasp_hf.kernels.triton import chunk
    from lasp_hf.parallel import comm, lasp, nccl

    for owner, names in SP_STEPS:
        module = {"lasp": lasp, "comm": comm, "chunk": chunk, "nccl": nccl}[owner.split(".")[0]]
        target = module if "." not in owner else getattr(module, owner.split(".")[1])
        for name in names:
            if hasattr(target, name):
                timed.wrap(target, name, label=lambda a, owner=owner, name=name: f"[{owner}] {name}")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        for _ in range(iters):
            step()
    finally:
        timed.restore()
    whole = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    out = [f"  whole call (instrumented): {whole:.0f} us"]
    accounted = 0.0
    for key, (count, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        us = seconds / iters * 1e6
        accounted += us if key.startswith(("launch ", "dist.")) else 0.0  # the others are nested or inclusive
        out.append(f"  {key:<45} {count / iters:5.1f} x  {us:7.0f} us  ({us / max(count / iters, 1e-9):5.1f} us each)")
    out.append(f"  {'rest (not in launch / dist. rows)':<45}         {whole - accounted:7.0f} us")
    out.append(f"  ATen ops per call (incl. nested): {sum(e.count for e in events) / 5:.0f}; most frequent:")
    for e in sorted(events, key=lambda e: -e.count)[:12]:
        out.append(f"    {e.key:<40} {e.count / 5:5.1f} x  self {e.self_cpu_time_total / 5:6.0f} us (profiled)")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[256, 8192])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--breakdown", action="store_true", help="accumulators instead of cProfile (see above)")
    parser.add_argument("--launch", nargs="+", default=["fast"], choices=["fast", "triton"],
                        help="kernel launches through lasp_hf's cached path (fast) and/or Triton's own (triton)")
    parser.add_argument("--report-rank", type=int, default=1, help="the rank whose breakdown is printed (all are "
                        "written; default 1, a middle rank of the ring)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    import lasp_hf
    from lasp_hf.kernels.triton import launch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    common.pin_cpus_from_env()  # (LASP_HF_BENCH_PIN=1: see common.pin_cpus_from_env)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    ctx = None
    if world > 1:
        dist.init_process_group("nccl", device_id=device)
        ctx = lasp_hf.init_sequence_parallel(world)
    H, D = 16, 128
    g = -torch.exp2(-8.0 * torch.arange(1, H + 1, device=device) / H)
    lines = [f"host_overhead: {common.card_name(device)}, W={world}, commit {common.git_commit()}"]
    providers = ["single"] + (["ring", "allgather"] if world > 1 else [])
    if args.breakdown:
        calib = "\n".join(every_rank(calibration(device), world))
        if rank == 0:
            print(calib, flush=True)
        lines += ["", "== calibration (host us per call)", calib]
    for T in args.T:
        q, k, v, do = (torch.randn(1, T, H, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        leaves = [x.requires_grad_() for x in (q, k, v)]
        for mode, provider in itertools.product(args.launch, providers):
            launch.ENABLED = mode == "fast"
            extra = {} if provider == "single" else {"sp_group": ctx, "sp_mode": provider}

            def step():
                o = lasp_hf.linear_attention(q, k, v, g, scale=1.0, **extra)[0]
                return torch.autograd.grad(o, leaves, do)

            def fwd():
                with torch.no_grad():
                    return lasp_hf.linear_attention(q, k, v, g, scale=1.0, **extra)[0]

            for _ in range(5):
                step()
            torch.cuda.synchronize()
            results = {}
            for name, fn in (("fwd+bwd", step), ("fwd(no_grad)", fwd)):
                if world > 1:
                    dist.barrier()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                host = (time.perf_counter() - t0) / args.iters * 1e6
                end.record()
                end.synchronize()
                results[name] = (host, start.elapsed_time(end) / args.iters * 1e3)
            if world > 1:
                dist.barrier()
            if args.breakdown:
                head = f"== {provider} T={T} ({mode} launches): " + ", ".join(
                    f"{n}: host {h:.0f} us, gpu-loop {gl:.0f} us per call" for n, (h, gl) in results.items())
                # Every rank's (rank 0 has no receive in the ring's forward, the last rank no send).
                texts = every_rank(breakdown(step, args.iters), world)
                if rank == 0:
                    print(head + "\n" + texts[min(args.report_rank, world - 1)], flush=True)
                lines += ["", head, *texts]
                continue
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.iters):
                step()
            prof.disable()
            torch.cuda.synchronize()
            stream = io.StringIO()
            pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(args.top)
            head = f"== {provider} T={T} ({mode} launches): " + ", ".join(
                f"{n}: host {h:.0f} us, gpu-loop {gl:.0f} us per call" for n, (h, gl) in results.items())
            if rank == 0:
                print(head, flush=True)
            lines += ["", head, stream.getvalue()]
    launch.ENABLED = True
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"host-overhead-{common.card_slug(common.card_name(device))}-W{world}.txt"
        path.write_text("\n".join(lines))
        print(f"wrote {path}")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
