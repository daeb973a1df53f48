"""Process groups for sequence parallelism and the one object that describes them.

An SP group of size W holds one sequence: its rank r owns tokens [r*T/W, (r+1)*T/W). The world is
split into SP groups of consecutive global ranks; the DP groups run across them (global rank
dp_rank * W + sp_rank), so every rank of one SP group gets the same batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from lasp_hf.parallel import nccl

SP_MODES = ("ring", "allgather")


@dataclass
class SequenceParallelContext:
    """Everything the sharded ops need to know about the SP group (passed to them, never global).

    Attributes:
        group: the SP process group (ranks that share one sequence, in sequence order).
        rank: this process's rank inside `group` (which slice of the sequence it holds).
        world_size: the number of ranks in `group` (W).
        mode: "ring" (LASP: the state hops rank to rank) or "allgather" (LASP-2).
        dp_group: the data-parallel group across SP groups (None when built from a bare group).
        dp_rank, dp_size: this process's place in `dp_group`.
        prev_rank, next_rank: global ranks of the SP neighbours r - 1 and r + 1 (None at the ends).
        direct: on NCCL, the exchanges' own communicator, called on the current stream (`parallel/nccl.py`;
            LASP_HF_DIRECT_NCCL=0: None, every exchange through `group`).
    """

    group: dist.ProcessGroup
    rank: int
    world_size: int
    mode: str = "ring"
    dp_group: dist.ProcessGroup | None = None
    dp_rank: int = 0
    dp_size: int = 1
    prev_rank: int | None = None
    next_rank: int | None = None
    # Shape signatures already checked to agree across the group (see lasp._check_across_ranks).
    checked_signatures: set = field(default_factory=set, repr=False, compare=False)
    # Sends whose completion nobody has waited for yet: (work, buffer), see lasp_hf.parallel.comm.
    pending_sends: list = field(default_factory=list, repr=False, compare=False)
    # The state exchanges' own NCCL communicator (lasp_hf.parallel.nccl.DirectComm), None: through `group`.
    direct: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.mode not in SP_MODES:
            raise ValueError(f"SP mode must be one of {SP_MODES}, got {self.mode!r}")

    @classmethod
    def from_group(cls, group: dist.ProcessGroup, mode: str = "ring", *, dp_group=None) -> SequenceParallelContext:
        """A context for an existing process group (this process must belong to it). Every rank of the group must
        call it: it connects the ring's neighbours (`comm.connect_neighbours`)."""
        _require_initialized()
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("this process is not a member of the SP group it was given")
        world_size = dist.get_world_size(group)
        dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        ctx = cls(
            group=group, rank=rank, world_size=world_size, mode=mode, dp_group=dp_group, dp_rank=dp_rank,
            dp_size=dp_size,
            prev_rank=dist.get_global_rank(group, rank - 1) if rank > 0 else None,
            next_rank=dist.get_global_rank(group, rank + 1) if rank < world_size - 1 else None,
        )
        from lasp_hf.parallel.comm import connect_neighbours  # comm imports this module

        if nccl.wanted(group):
            ctx.direct = nccl.DirectComm(group, rank, world_size, torch.device("cuda", torch.cuda.current_device()),
                                         timeout=group_timeout(group))
        connect_neighbours(ctx)
        return ctx

    def validate(self) -> None:
        """Raise ValueError when the recorded rank / world size disagree with the process group."""
        actual_size = dist.get_world_size(self.group)
        actual_rank = dist.get_rank(self.group)
        if actual_size != self.world_size or actual_rank != self.rank:
            raise ValueError(
                f"SequenceParallelContext says rank {self.rank} of {self.world_size}, but its process group "
                f"has this process at rank {actual_rank} of {actual_size}; build it with "
                "init_sequence_parallel or SequenceParallelContext.from_group"
            )


def group_timeout(group=None) -> datetime.timedelta | None:
    """The timeout that bounds `group`'s collectives (the default group's when None), or None where this torch does
    not say (it is read from the backend's options, which torch does not document)."""
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        for device in ("cuda", "cpu"):
            try:
                timeout = pg._get_backend(torch.device(device)).options._timeout
            except (RuntimeError, AttributeError, ValueError):
                continue
            if isinstance(timeout, datetime.timedelta):
                return timeout
    except (RuntimeError, AttributeError, ValueError):
        pass
    return None


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group first "
            "(torchrun and `accelerate launch` set up the environment for it)"
        )


def init_sequence_parallel(sp_size: int, mode: str = "ring", *, device_mesh=None, backend=None, timeout=None
                           ) -> SequenceParallelContext:
    """Build the SP and DP groups and return this process's `SequenceParallelContext`.

    Args:
        sp_size: ranks per sequence (W); must divide the world size. SP groups are consecutive
            global ranks [i*W, (i+1)*W); DP group j holds ranks j, W + j, 2W + j, ...
        mode: "ring" or "allgather", the default `sp_mode` the model passes to the op.
        device_mesh: optional torch DeviceMesh with dims named "dp" and "sp"; its groups are used
            instead of building new ones (its "sp" size must equal sp_size). The groups built here use
            high-priority NCCL streams; for a mesh's groups, TORCH_NCCL_HIGH_PRIORITY=1 does the same.
        backend: process-group backend for the new groups (None: the default group's).
        timeout: optional `datetime.timedelta` bounding every collective of the new groups (None: the default
            group's, as passed to `init_process_group` or accelerate's `InitProcessGroupKwargs`; torch's own default
            would be 30 minutes), so a dead or stuck peer fails the others instead of hanging them. The direct NCCL
            exchanges (`parallel/nccl.py`) are bounded by it too, through a watchdog thread.

    Every rank must call this, with the same arguments, in the same order relative to other
    group creation: `new_group` is collective over the whole world.
    """
    _require_initialized()
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size must be an integer >= 1, got {sp_size!r}")
    if mode not in SP_MODES:
        raise ValueError(f"mode must be one of {SP_MODES}, got {mode!r}")
    world_size = dist.get_world_size()
    if world_size % sp_size != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"sp_size = {sp_size} does not divide the world size {world_size}; valid sizes are {divisors}"
        )
    if device_mesh is not None:
        names = tuple(device_mesh.mesh_dim_names or ())
        if "sp" not in names or "dp" not in names:
            raise ValueError(f"device_mesh needs dims named 'dp' and 'sp', got {names}")
        if device_mesh.size(names.index("sp")) != sp_size:
            raise ValueError(
                f"device_mesh's 'sp' dim has size {device_mesh.size(names.index('sp'))}, but sp_size = {sp_size}"
            )
        return SequenceParallelContext.from_group(
            device_mesh.get_group("sp"), mode, dp_group=device_mesh.get_group("dp")
        )

    if timeout is None:
        timeout = group_timeout()
    rank = dist.get_rank()
    num_sp_groups = world_size // sp_size
    sp_group = dp_group = None
    # new_group must be called by every rank for every group, in the same order.
    for i in range(num_sp_groups):
        ranks = list(range(i * sp_size, (i + 1) * sp_size))
        group = dist.new_group(ranks, backend=backend, timeout=timeout, pg_options=_sp_group_options(backend))
        if rank in ranks:
            sp_group = group
    for j in range(sp_size):
        ranks = list(range(j, world_size, sp_size))
        group = dist.new_group(ranks, backend=backend, timeout=timeout)
        if rank in ranks:
            dp_group = group
    return SequenceParallelContext.from_group(sp_group, mode, dp_group=dp_group)


def _sp_group_options(backend):
    """NCCL options of the SP groups: high-priority streams, so that a state exchange's small kernels get the SMs
    ahead of the local pass's kernels, which otherwise hold every SM until they end (measured on 4x H100: the last
    rank's backward send waited out the whole dq kernel). None for other backends."""
    if os.environ.get("LASP_HF_SP_HIGH_PRIORITY", "1") == "0":
        return None
    name = backend if backend is not None else dist.get_backend()
    if str(name).lower() != "nccl" or not hasattr(dist, "ProcessGroupNCCL"):
        return None
    return dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)


def as_sp_context(sp_group, mode: str | None = None) -> SequenceParallelContext:
    """Accept a context or a bare ProcessGroup (wrapped once and cached); check it matches its group."""
    if isinstance(sp_group, SequenceParallelContext):
        ctx = sp_group
    elif isinstance(sp_group, dist.ProcessGroup):
        ctx = _wrapped_groups.get(sp_group)
        if ctx is None:
            ctx = SequenceParallelContext.from_group(sp_group, mode or "ring")
            _wrapped_groups[sp_group] = ctx
    else:
        raise ValueError(  # noqa: TRY004 - the project's rule: bad user input is a ValueError
            f"sp_group must be a SequenceParallelContext or a torch.distributed ProcessGroup, got "
            f"{type(sp_group).__name__}"
        )
    _require_initialized()
    ctx.validate()
    return ctx


_wrapped_groups: dict = {}
