"""Run a function on W local processes joined by a gloo process group (CPU tests of SP).

    from distributed_utils import run_distributed
    results = run_distributed(my_worker, 3, arg1, arg2)   # my_worker(arg1, arg2) on ranks 0..2

Inside `my_worker`, torch.distributed is initialized (default group = all W ranks) and torch uses
one thread per process. Its return value (anything `torch.save` can write) comes back per rank,
in rank order; an exception in any rank fails the call with that rank's traceback.

Processes are forked where the OS allows it: a spawned process re-imports torch and transformers
(5-15 s on a 2-core machine), a forked one starts in 0.1 s. Forking is safe here because the
workers run CPU code on one thread and the parent holds no process group or CUDA context. Pass
start_method="spawn" otherwise (then `my_worker` must be a module-level, importable function).
"""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, fn, args, workdir, backend, timeout_s):
    torch.set_num_threads(1)
    device_id = None
    if backend == "nccl":
        # One GPU per rank; binding it at init lets NCCL set up its communicators eagerly.
        device_id = torch.device("cuda", rank)
        torch.cuda.set_device(device_id)
    dist.init_process_group(
        backend, init_method=f"file://{os.path.join(workdir, 'store')}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id,
    )
    try:
        result = fn(*args)
        torch.save(result, os.path.join(workdir, f"result-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 120.0,
                    start_method: str | None = None, env: dict | None = None) -> list:
    """fn(*args) on `world_size` processes; returns the list of their return values (rank order).

    timeout_s bounds every collective, so a rank left waiting (a mismatched send/recv) fails the
    test instead of hanging it. start_method: "fork" (the default where available, except
    with backend="nccl": CUDA cannot be forked) or "spawn". With "nccl", rank r uses cuda:r.
    env: environment variables for the workers (set in this process while they start; use
    start_method="spawn" for variables read at import time, such as TRITON_INTERPRET).
    """
    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() and backend != "nccl" else "spawn"
    saved = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    try:
        with tempfile.TemporaryDirectory(prefix="lasp-dist-") as workdir:
            mp.start_processes(_worker, args=(world_size, fn, args, workdir, backend, timeout_s), nprocs=world_size,
                               join=True, start_method=start_method)
            return [torch.load(os.path.join(workdir, f"result-{r}.pt"), weights_only=False) for r in range(world_size)]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (inf when x has NaN; the absolute error when ref is 0)."""
    x, ref = x.detach().double(), ref.detach().double()
    if torch.isnan(x).any():
        return float("inf")
    denom = ref.norm().item()
    err = (x - ref).norm().item()
    return err / denom if denom > 0 else err
