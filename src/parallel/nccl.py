"""NCCL called directly (ctypes) for the state exchanges of sequence parallelism.

Why: one LASP layer makes four point-to-point calls (ring) or two all_gathers, each moving a ~1 MB float32 state.
Through `torch.distributed` each call also creates a Work object, records and waits on CUDA events on the
process group's own stream, notes the tensors for the watchdog and the flight recorder: measured on 4x H100
hosts, 80-120 us of host time per call against ~20 us for the same NCCL call made directly
(`benchmarks/p2p_host.py`). At 32K tokens per GPU one layer's GPU work is ~1.6 ms, and those calls made the layer
host-bound. Here the calls go on the CURRENT CUDA stream: stream order alone makes the result visible to the work
queued after them and keeps the buffers alive long enough (no events, no record_stream).

The communicator is NCCL's own, created once per SP group (its unique id broadcast through the group), from the
libnccl that torch loaded. Trade-off: these calls are outside the process group's watchdog, so a dead peer hangs
the exchange instead of timing out after `init_sequence_parallel(timeout=...)`; `LASP_HF_DIRECT_NCCL=0` turns this
path off (every exchange through the process group, with its timeouts).
"""

from __future__ import annotations

import ctypes
import glob
import os

import torch
import torch.distributed as dist

ENV_SWITCH = "LASP_HF_DIRECT_NCCL"

# ncclDataType_t values (nccl.h; stable across NCCL 2.x) of what the exchanges move: float32 states.
_DTYPES = {torch.float32: 7}


# The current stream's raw handle by device index, as Triton's launcher reads it (a private torch function: the public
# `torch.cuda.current_stream(device).cuda_stream` builds a Stream object per call; used where this torch lacks it).
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or \
    (lambda index: torch.cuda.current_stream(index).cuda_stream)


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


_library = None  # the loaded libnccl, False when none could be loaded


def load_library():
    """The libnccl in this process (torch's), or None. Its function signatures are declared once."""
    global _library
    if _library is None:
        lib = None
        try:
            lib = ctypes.CDLL("libnccl.so.2")  # already loaded by torch: the same library object
        except OSError:
            try:
                import nvidia.nccl  # torch's pip dependency

                paths = glob.glob(os.path.join(next(iter(nvidia.nccl.__path__)), "lib", "libnccl.so*"))
                lib = ctypes.CDLL(paths[0]) if paths else None
            except (ImportError, OSError, StopIteration):
                lib = None
        if lib is not None:
            ptr, size, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
            lib.ncclGetErrorString.restype = ctypes.c_char_p
            lib.ncclGetErrorString.argtypes = [i32]
            lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(_UniqueId)]
            lib.ncclCommInitRank.argtypes = [ctypes.POINTER(ptr), i32, _UniqueId, i32]
            lib.ncclCommDestroy.argtypes = [ptr]
            lib.ncclSend.argtypes = [ptr, size, i32, i32, ptr, ptr]
            lib.ncclRecv.argtypes = [ptr, size, i32, i32, ptr, ptr]
            lib.ncclAllGather.argtypes = [ptr, ptr, size, i32, ptr, ptr]
            for name in ("ncclGetUniqueId", "ncclCommInitRank", "ncclCommDestroy", "ncclSend", "ncclRecv",
                         "ncclAllGather"):
                getattr(lib, name).restype = i32
        _library = lib if lib is not None else False
    return _library or None


def _check(lib, result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"NCCL {what} failed: {lib.ncclGetErrorString(result).decode()} (ncclResult_t {result}); "
                           f"set {ENV_SWITCH}=0 to exchange states through torch.distributed instead")


class DirectComm:
    """An NCCL communicator over one SP group (comm rank = SP rank), calls on the current CUDA stream.

    Made collectively: every rank of `group` must construct it at the same point (the unique id is broadcast)."""

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, device: torch.device):
        lib = load_library()
        if lib is None:
            raise RuntimeError("libnccl could not be loaded")
        self.lib, self.device, self.rank, self.world_size = lib, device, rank, world_size
        uid = _UniqueId()
        if rank == 0:
            _check(lib, lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        raw = torch.frombuffer(bytearray(bytes(uid)), dtype=torch.uint8).to(device)
        dist.broadcast(raw, dist.get_global_rank(group, 0), group=group)
        uid = _UniqueId.from_buffer_copy(bytes(raw.cpu().tolist()))
        self.comm = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(lib, lib.ncclCommInitRank(ctypes.byref(self.comm), world_size, uid, rank), "ncclCommInitRank")

    def _args(self, x: torch.Tensor):
        # (get_device(): an int, cheaper per call than building x.device)
        if not x.is_contiguous() or x.get_device() != self.device.index or x.dtype not in _DTYPES:
            raise ValueError(f"direct NCCL needs a contiguous tensor on {self.device} of dtype in "
                             f"{sorted(map(str, _DTYPES))}; got {tuple(x.shape)} {x.dtype} on {x.device}")
        return x.data_ptr(), x.numel(), _DTYPES[x.dtype]

    def send(self, x: torch.Tensor, peer: int) -> None:
        """Send x to SP rank `peer` on the current stream (x must stay unchanged until the stream gets there)."""
        ptr, n, dtype = self._args(x)
        stream = _current_stream(self.device.index)
        _check(self.lib, self.lib.ncclSend(ptr, n, dtype, peer, self.comm, stream), "ncclSend")

    def recv(self, x: torch.Tensor, peer: int) -> None:
        """Receive into x from SP rank `peer` on the current stream."""
        ptr, n, dtype = self._args(x)
        stream = _current_stream(self.device.index)
        _check(self.lib, self.lib.ncclRecv(ptr, n, dtype, peer, self.comm, stream), "ncclRecv")

    def all_gather(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out [W * x.numel()] = every rank's x in rank order, on the current stream."""
        src, n, dtype = self._args(x)
        dst, total, out_dtype = self._args(out)
        if out_dtype != dtype or total != n * self.world_size:
            raise ValueError(f"all_gather output must hold {self.world_size} x {n} elements of {x.dtype}, "
                             f"got {total} of {out.dtype}")
        stream = _current_stream(self.device.index)
        _check(self.lib, self.lib.ncclAllGather(src, dst, n, dtype, self.comm, stream), "ncclAllGather")

    def close(self) -> None:
        """Destroy the communicator (collective over the group; the context's lives as long as the process)."""
        if self.comm:
            self.lib.ncclCommDestroy(self.comm)
            self.comm = ctypes.c_void_p()


def wanted(group: dist.ProcessGroup) -> bool:
    """Whether an SP group should exchange states through a `DirectComm`: an NCCL group of more than one rank, the
    switch not turned off, and a libnccl to call."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or dist.get_world_size(group) < 2:
        return False
    if str(dist.get_backend(group)).lower() != "nccl" or not torch.cuda.is_available():
        return False
    return load_library() is not None
