"""Host time of one ring hop's point-to-point calls: torch.distributed (ProcessGroupNCCL) against NCCL called
directly (ctypes, on the current stream). torchrun --nproc_per_node 4 benchmarks/p2p_host.py"""

from __future__ import annotations

import ctypes
import glob
import os
import time

import torch
import torch.distributed as dist


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


def load_nccl():
    try:
        return ctypes.CDLL("libnccl.so.2")
    except OSError:
        import nvidia.nccl
        return ctypes.CDLL(glob.glob(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so*"))[0])


def main():
    if not torch.cuda.is_available() or "RANK" not in os.environ:
        print("p2p_host.py: needs CUDA GPUs and torchrun (torchrun --nproc_per_node 4 benchmarks/p2p_host.py)")
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    group = dist.new_group(list(range(world)))
    nccl = load_nccl()
    uid = UniqueId()
    if rank == 0:
        assert nccl.ncclGetUniqueId(ctypes.byref(uid)) == 0
    raw = torch.tensor(bytearray(bytes(uid)), dtype=torch.uint8, device=device)
    dist.broadcast(raw, 0, group=group)
    uid = UniqueId.from_buffer_copy(bytes(raw.cpu().tolist()))
    comm = ctypes.c_void_p()
    assert nccl.ncclCommInitRank(ctypes.byref(comm), world, uid, rank) == 0
    nccl.ncclSend.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_void_p]
    nccl.ncclRecv.argtypes = nccl.ncclSend.argtypes
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
        stream = torch.cuda.current_stream().cuda_stream
        if prv is not None:
            assert nccl.ncclRecv(bufs[0].data_ptr(), x.numel(), 7, prv, comm, stream) == 0
        if nxt is not None:
            assert nccl.ncclSend(x.data_ptr(), x.numel(), 7, nxt, comm, stream) == 0

    def launch():
        bufs[1].add_(1.0)

    out = []
    for name, fn in (("kernel launch (add_)", launch), ("PG recv+send (+wait)", pg_hop), ("raw NCCL recv+send", raw_hop),
                     ("PG recv+send (+wait)", pg_hop), ("raw NCCL recv+send", raw_hop)):
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
    nccl.ncclCommDestroy(comm)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
