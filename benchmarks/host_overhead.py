"""Host (CPU) time of one forward+backward of the op: is a small or medium T host-bound?

    python benchmarks/host_overhead.py                                   # one GPU: single op
    torchrun --standalone --nproc_per_node 4 benchmarks/host_overhead.py  # also ring and allgather

For each provider and T: `host_us` (Python time per fwd+bwd call, no synchronisation, averaged over a
loop that the GPU cannot keep up with only if the GPU is slower), `gpu_us` (CUDA events around the same
loop: max(host, GPU) per call when host-bound) and the top functions of a cProfile of the loop (rank 0),
sorted by own time. Writes benchmarks/results/host-overhead-<card>-W<n>.txt from rank 0.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402 - also turns NCCL multicast off (NO_MULTICAST_ENV)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[256, 8192])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    import lasp_hf

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
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
    for T in args.T:
        q, k, v, do = (torch.randn(1, T, H, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        leaves = [x.requires_grad_() for x in (q, k, v)]
        for provider in providers:
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
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.iters):
                step()
            prof.disable()
            torch.cuda.synchronize()
            stream = io.StringIO()
            pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(args.top)
            head = f"== {provider} T={T}: " + ", ".join(
                f"{n}: host {h:.0f} us, gpu-loop {gl:.0f} us per call" for n, (h, gl) in results.items())
            if rank == 0:
                print(head, flush=True)
            lines += ["", head, stream.getvalue()]
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
