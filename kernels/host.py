"""Host-side helpers that keep the CPU ahead of the GPU.

A CUDA tensor read back to the host (`.tolist()`, `.item()`) or made from host values with a plain
`torch.tensor(values, device=...)` / `.to(device)` makes the CPU wait until the GPU has run everything queued
before it. Once per training step that costs nothing; once or more per layer it leaves the GPU idle while the
CPU queues the next kernels (a tnl-1b training profile had ~190 such waits per step). Hence:

- `host_bounds(cu_seqlens)`: a packed batch's boundaries, read back once per tensor and kept on it (every layer,
  forward and backward, gets the same `cu_seqlens` tensor);
- `device_ints(values, device)`: small index tables copied from pinned memory without waiting.
"""

from __future__ import annotations

import torch

_ATTRIBUTE = "_lasp_host_bounds"


def host_bounds(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """cu_seqlens as Python ints. A device tensor is read back once and the values are kept on the tensor,
    keyed by its version counter, so an in-place change is seen; tensors made under inference mode have no
    version counter and are read every time."""
    if cu_seqlens.device.type == "cpu":
        return tuple(cu_seqlens.tolist())
    try:
        version = cu_seqlens._version
    except RuntimeError:  # inference tensor
        return tuple(cu_seqlens.tolist())
    cached = getattr(cu_seqlens, _ATTRIBUTE, None)
    if cached is not None and cached[0] == version:
        return cached[1]
    bounds = tuple(cu_seqlens.tolist())
    setattr(cu_seqlens, _ATTRIBUTE, (version, bounds))
    return bounds


def device_ints(values, device, dtype=torch.int64) -> torch.Tensor:
    """A 1-D tensor of host ints on `device`; on CUDA copied from pinned memory without a stream sync (the
    pinned block is not reused before the copy has run: torch's host allocator records the copy's stream)."""
    host = torch.as_tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def device_tables(tables: dict[str, torch.Tensor], device, dtype=torch.int64) -> dict[str, torch.Tensor]:
    """Several 1-D host int tensors on `device` with one copy (see `device_ints`), as views of one buffer."""
    flat = device_ints(torch.cat([table.to(dtype).reshape(-1) for table in tables.values()]), device, dtype)
    return dict(zip(tables, flat.split([table.numel() for table in tables.values()])))


def device_cu_seqlens(bounds, device) -> torch.Tensor:
    """int32 cu_seqlens on `device` from host boundaries, copied without waiting, with `host_bounds` already
    known (so the op that receives it does not read it back)."""
    bounds = tuple(int(b) for b in bounds)
    tensor = device_ints(bounds, device, torch.int32)
    if tensor.device.type != "cpu":
        setattr(tensor, _ATTRIBUTE, (tensor._version, bounds))
    return tensor
