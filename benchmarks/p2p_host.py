"""Host time of one ring hop's point-to-point calls: torch.distributed (ProcessGroupNCCL) against NCCL called
directly (`lasp_hf.parallel.nccl.DirectComm`, what the SP op uses on NCCL: ctypes, on the current stream).
torchrun --nproc_per_node 4 benchmarks/p2p_host.py"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from lasp_hf.parallel.nccl import DirectComm


def main():
    if not torch.cuda.is_available() or "RANK" not in os.environ:
        print("p2p_host.py: needs CUDA GPUs and torchrun (torchrun --nproc_per_node 4 benchmarks/p2p_host.py)")
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    group = dist.new_group(list(range(world)))
    direct = DirectComm(group, rank, world, device)
    x = torch.randn(16, 128, 128, device=device)
    bufs = [torch.empty_like(x) for _ in range(4)]
    nxt, prv = (rank + 1) if rank + 1 < world else None, (rank - 1) if rank > 0 else None

    def pg_hop():
        if prv is not None:
            w = group.recv([bufs[0]], prv, 0)
            w.wait()
        if nxt is not None:
            w = group.send([x], nxt, 0)
            w.wait()

    def raw_hop():
        if prv is not None:
            direct.recv(bufs[0], prv)
        if nxt is not None:
            direct.send(x, nxt)

    def launch():
        bufs[1].add_(1.0)

    out = []
    for name, fn in (("kernel launch (add_)", launch), ("PG recv+send (+wait)", pg_hop), ("direct NCCL recv+send", raw_hop),
                     ("PG recv+send (+wait)", pg_hop), ("direct NCCL recv+send", raw_hop)):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - t0) / 200 * 1e6
        out.append(f"rank {rank}: {name:<24} host {host:7.1f} us / hop, with GPU {gpu:7.1f} us")
    every = [None] * world
    dist.all_gather_object(every, "\n".join(out))
    if rank == 0:
        print(f"FR={os.environ.get('TORCH_FR_BUFFER_SIZE')}\n" + "\n".join(every), flush=True)
    dist.barrier()
    direct.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
