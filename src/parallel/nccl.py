"""NCCL called directly (ctypes) for the state exchanges of sequence parallelism.

Why: one LASP layer makes four point-to-point calls (ring) or two all_gathers, each moving a ~1 MB float32 state.
Through `torch.distributed` each call also creates a Work object, records and waits on CUDA events on the
process group's own stream, notes the tensors for the watchdog and the flight recorder: measured on 4x H100
hosts, 80-120 us of host time per call against ~20 us for the same NCCL call made directly
(a P2P host-cost probe, since folded into the SP benchmark). At 32K tokens per GPU one layer's GPU work is ~1.6 ms, and those calls made the layer
host-bound. Here the calls go on the CURRENT CUDA stream: stream order alone makes the result visible to the work
queued after them and keeps the buffers alive long enough (no events, no record_stream).

The communicator is NCCL's own, created once per SP group (its unique id broadcast through the group), from the
libnccl that torch loaded. These calls are outside the process group's watchdog, so they have their own
(`_Watchdog`): at most once per poll interval an exchange marks its stream with a CUDA event, and a thread polls
it; if that event is not reached within the SP group's timeout (`init_sequence_parallel(timeout=...)`, by default
the default group's), a peer is dead or stuck: the thread logs it and aborts the communicator (`ncclCommAbort`,
which ends the waiting NCCL kernels), and every later exchange raises a RuntimeError naming the timeout. Exchanges
inside a CUDA graph capture are not marked (a graph's replays are not watched). `LASP_HF_DIRECT_NCCL=0` turns
this path off (every exchange through the process group, with its own watchdog).
"""

from __future__ import annotations

import ctypes
import datetime
import glob
import logging
import os
import threading
import time

import torch
import torch.distributed as dist

ENV_SWITCH = "LASP_HF_DIRECT_NCCL"
logger = logging.getLogger(__name__)

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
            lib.ncclCommAbort.argtypes = [ptr]
            lib.ncclSend.argtypes = [ptr, size, i32, i32, ptr, ptr]
            lib.ncclRecv.argtypes = [ptr, size, i32, i32, ptr, ptr]
            lib.ncclAllGather.argtypes = [ptr, ptr, size, i32, ptr, ptr]
            for name in ("ncclGetUniqueId", "ncclCommInitRank", "ncclCommDestroy", "ncclCommAbort", "ncclSend",
                         "ncclRecv", "ncclAllGather"):
                getattr(lib, name).restype = i32
        _library = lib if lib is not None else False
    return _library or None


def _check(lib, result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"NCCL {what} failed: {lib.ncclGetErrorString(result).decode()} (ncclResult_t {result}); "
                           f"set {ENV_SWITCH}=0 to exchange states through torch.distributed instead")


def _relaxed_capture_mode() -> None:
    """Let this thread query events while another thread captures a CUDA graph in the default "global" mode (torch's
    own NCCL watchdog does the same); best effort: without libcudart at hand the thread runs as it is."""
    try:
        cudart = ctypes.CDLL("libcudart.so.12")
    except OSError:
        try:
            import nvidia.cuda_runtime  # torch's pip dependency

            paths = glob.glob(os.path.join(next(iter(nvidia.cuda_runtime.__path__)), "lib", "libcudart.so*"))
            cudart = ctypes.CDLL(paths[0]) if paths else None
        except (ImportError, OSError, StopIteration):
            cudart = None
    if cudart is not None:
        mode = ctypes.c_int(2)  # cudaStreamCaptureModeRelaxed
        cudart.cudaThreadExchangeStreamCaptureMode(ctypes.byref(mode))


class _Watchdog:
    """Ends a direct exchange that waits longer than `timeout` (see the module docstring).

    The exchanging thread calls `mark(stream)` after each call: that records an event only when none is being
    watched (one event record per poll interval at most, a flag check otherwise). The watchdog thread polls it."""

    def __init__(self, comm: DirectComm, timeout: datetime.timedelta):
        self.comm, self.timeout = comm, timeout.total_seconds()
        self.poll = min(max(self.timeout / 8, 0.05), 5.0)
        self.event = torch.cuda.Event()
        self.armed_at = None  # when the watched event was recorded; None: nothing watched
        self.error = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lasp-hf-nccl-watchdog", daemon=True)
        self.thread.start()

    def mark(self, stream_index: int) -> None:
        if self.armed_at is not None or torch.cuda.is_current_stream_capturing():
            return
        self.event.record(torch.cuda.current_stream(stream_index))
        self.armed_at = time.monotonic()

    def _run(self) -> None:
        torch.cuda.set_device(self.comm.device)
        _relaxed_capture_mode()
        while not self.stopped.wait(self.poll):
            armed_at = self.armed_at
            if armed_at is None:
                continue
            if self.event.query():
                self.armed_at = None
            elif time.monotonic() - armed_at > self.timeout:
                self.error = (f"a direct NCCL state exchange of sequence parallelism (SP rank {self.comm.rank} of "
                              f"{self.comm.world_size}) did not complete within the SP group's timeout of "
                              f"{self.timeout:.0f} s: a peer is dead or stuck. The communicator was aborted.")
                logger.error(self.error)
                self.comm.abort()
                return

    def stop(self) -> None:
        self.stopped.set()


class DirectComm:
    """An NCCL communicator over one SP group (comm rank = SP rank), calls on the current CUDA stream.

    Made collectively: every rank of `group` must construct it at the same point (the unique id is broadcast).
    timeout: bounds each exchange (`_Watchdog`); None: unbounded."""

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, device: torch.device,
                 timeout: datetime.timedelta | None = None):
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
        self.lock = threading.Lock()  # the watchdog's abort never runs in the middle of a call
        self.watchdog = _Watchdog(self, timeout) if timeout is not None else None

    def _call(self, name: str, *args) -> None:
        watchdog = self.watchdog
        if watchdog is not None and watchdog.error is not None:
            raise RuntimeError(watchdog.error)
        with self.lock:
            if not self.comm:
                raise RuntimeError(f"NCCL {name} on a closed or aborted communicator")
            _check(self.lib, getattr(self.lib, name)(*args, self.comm, _current_stream(self.device.index)), name)
        if watchdog is not None:
            watchdog.mark(self.device.index)

    def check(self) -> None:
        """Raise the watchdog's error, if it ended the communicator."""
        if self.watchdog is not None and self.watchdog.error is not None:
            raise RuntimeError(self.watchdog.error)

    def abort(self) -> None:
        """Abort the communicator: NCCL kernels waiting for a peer end (their results are garbage)."""
        acquired = self.lock.acquire(timeout=5.0)  # a call blocked inside NCCL must not stop the abort
        try:
            if self.comm:
                self.lib.ncclCommAbort(self.comm)
                self.comm = ctypes.c_void_p()
        finally:
            if acquired:
                self.lock.release()

    def _args(self, x: torch.Tensor):
        # (get_device(): an int, cheaper per call than building x.device)
        if not x.is_contiguous() or x.get_device() != self.device.index or x.dtype not in _DTYPES:
            raise ValueError(f"direct NCCL needs a contiguous tensor on {self.device} of dtype in "
                             f"{sorted(map(str, _DTYPES))}; got {tuple(x.shape)} {x.dtype} on {x.device}")
        return x.data_ptr(), x.numel(), _DTYPES[x.dtype]

    def send(self, x: torch.Tensor, peer: int) -> None:
        """Send x to SP rank `peer` on the current stream (x must stay unchanged until the stream gets there)."""
        ptr, n, dtype = self._args(x)
        self._call("ncclSend", ptr, n, dtype, peer)

    def recv(self, x: torch.Tensor, peer: int) -> None:
        """Receive into x from SP rank `peer` on the current stream."""
        ptr, n, dtype = self._args(x)
        self._call("ncclRecv", ptr, n, dtype, peer)

    def all_gather(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out [W * x.numel()] = every rank's x in rank order, on the current stream."""
        src, n, dtype = self._args(x)
        dst, total, out_dtype = self._args(out)
        if out_dtype != dtype or total != n * self.world_size:
            raise ValueError(f"all_gather output must hold {self.world_size} x {n} elements of {x.dtype}, "
                             f"got {total} of {out.dtype}")
        self._call("ncclAllGather", src, dst, n, dtype)

    def close(self) -> None:
        """Destroy the communicator (collective over the group; the context's lives as long as the process)."""
        if self.watchdog is not None:
            self.watchdog.stop()
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
