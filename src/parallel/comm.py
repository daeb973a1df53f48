"""Every collective that sequence parallelism uses, one small function per pattern.

Shapes: B batch, H heads, K key dim, V value dim, W ranks in the SP group. States are float32
[B, H, K, V]; decays are float32 [B, H].

The state exchanges (ring, all-gather) are plain functions with a forward and a backward half:
`lasp._LaspFunction` calls them from its own forward and backward, because the order matters
(the backward exchange must run before the local backward pass, which needs its result).
The K/V gather of softmax layers is an autograd Function (all_gather forward, reduce_scatter
backward).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from lasp_hf.parallel.context import SequenceParallelContext

# Newer torch names the flat collectives *_single (the *_tensor names are deprecated there); same arguments.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor



def all_gather_stacked(x: torch.Tensor, sp: SequenceParallelContext) -> torch.Tensor:
    """[*S] on every rank -> [W, *S]: entry s is rank s's x."""
    x = x.contiguous()
    out = x.new_empty(sp.world_size * x.numel())
    _all_gather_flat(out, x.view(-1), group=sp.group)
    return out.view(sp.world_size, *x.shape)


def reduce_scatter_stacked(xs: torch.Tensor, sp: SequenceParallelContext) -> torch.Tensor:
    """[W, *S] on every rank -> [*S]: rank s gets the sum over ranks of their xs[s]."""
    xs = xs.contiguous()
    out = xs.new_empty(xs[0].shape)
    _reduce_scatter_flat(out.view(-1), xs.view(-1), group=sp.group)
    return out


def _isend(x: torch.Tensor, peer: int, sp: SequenceParallelContext):
    """Asynchronous send to SP-group rank `peer`, straight to the process group (`dist.isend` checks its
    arguments and translates ranks first: a noticeable part of a layer's host time on a slow host)."""
    return sp.group.send([x], peer, 0)


def _irecv(x: torch.Tensor, peer: int, sp: SequenceParallelContext):
    """Asynchronous receive from SP-group rank `peer` into x (see `_isend`)."""
    return sp.group.recv([x], peer, 0)


class _DeferredRecv(NamedTuple):
    """A receive that `_received` makes where its result is needed, on the current stream (direct NCCL: posting
    it early on the compute stream would hold that stream's later work behind the sender)."""

    shape: tuple
    device: torch.device
    peer: int


def _post_recv(shape, device, peer: int | None, sp: SequenceParallelContext):
    """A float32 buffer of `shape` and the receive into it from SP-group rank `peer` (direct NCCL: a
    `_DeferredRecv`), or None without a peer."""
    if peer is None:
        return None
    if sp.direct is not None:
        return _DeferredRecv(tuple(shape), torch.device(device), peer)
    buf = torch.empty(shape, dtype=torch.float32, device=device)
    return buf, _irecv(buf, peer, sp)


def pending_buffer(pending) -> torch.Tensor | None:
    """The buffer a posted receive writes into (None: no receive, or one made later on the current stream)."""
    return pending[0] if pending is not None and not isinstance(pending, _DeferredRecv) else None


def post_recv_from_prev(shape, device, sp: SequenceParallelContext):
    """Post the receive of the float32 state that rank r-1 will send; returns (buffer, work) or None on rank 0.

    Posting it before this rank's own state pass lets the sender's send complete as soon as it is issued.
    """
    return _post_recv(shape, device, sp.rank - 1 if sp.prev_rank is not None else None, sp)


def post_recv_from_next(shape, device, sp: SequenceParallelContext):
    """The same from rank r+1 (None on the last rank)."""
    return _post_recv(shape, device, sp.rank + 1 if sp.next_rank is not None else None, sp)


def _received(pending, sp: SequenceParallelContext) -> torch.Tensor | None:
    """Wait for a posted receive (on NCCL the wait only orders the current CUDA stream); its buffer, or None.
    A deferred receive (direct NCCL) is made now, on the current stream."""
    if pending is None:
        return None
    if isinstance(pending, _DeferredRecv):
        buf = torch.empty(pending.shape, dtype=torch.float32, device=pending.device)
        sp.direct.recv(buf, pending.peer)
        return buf
    buf, work = pending
    work.wait()
    return buf


def _send_later(x: torch.Tensor, peer: int, sp: SequenceParallelContext) -> None:
    """Asynchronous send of x to SP-group rank `peer`, waited for later by `wait_sends` (the caller does so
    after its local pass, before it returns).

    Nothing between the send and that point needs the send to have completed, so waiting at once would
    only put the sender's compute stream (and, on gloo, its host) behind the receiver. The buffer stays
    referenced until the wait, so the caching allocator cannot hand its memory to another tensor while the
    send may still read it.
    """
    x = x.contiguous()
    if sp.direct is not None:
        # On the current stream: stream order keeps x intact until the send has read it; nothing to wait for.
        sp.direct.send(x, peer)
        return
    sp.pending_sends.append((_isend(x, peer, sp), x))


def wait_sends(sp: SequenceParallelContext) -> None:
    """Wait for (order the current stream after) every send still pending on this context, and drop them."""
    while sp.pending_sends:
        work, _ = sp.pending_sends.pop()
        work.wait()


def _combine(local, decay, carried):
    """local + decay * carried (decay: a factor [B, H, 1, 1]); a None decay or carried state stands for zeros."""
    if carried is None or decay is None:
        return local
    return torch.addcmul(local, decay, carried)


class SideStream:
    """A block of work on a second CUDA stream that starts after everything queued so far on the current one and
    that the current stream waits for only at `join` (on CPU the block simply runs). Sequence parallelism runs the
    backward's exchange (receive, combine, send) here, so that it overlaps the local backward's dq kernel.

        with SideStream(device, ds_direct, decay) as side:  # tensors made on the main stream and used in the block
            ...
        ...                                                 # main-stream work, concurrent with the block
        side.join()                                         # the main stream waits for the block here

    The side stream has the highest priority: its small kernels take the SMs that the main stream's long kernels
    free first, instead of queueing behind the rest of them.

    No `record_stream`: the block's inputs stay referenced here until `join`, after which the main stream's later
    work (a new tensor in their memory included) is ordered after the block's; tensors made in the block come from
    the side stream's pool, and the side stream's next block waits for the main stream first, so it cannot reuse
    their memory while main-stream work queued earlier still reads it. (record_stream would add a CUDA event per
    tensor at its free, which the allocator then polls, for no ordering the above does not already give.)
    """

    # Per device: (the side stream, an event marking the main stream's progress, one marking the side stream's).
    # The events are recorded again by every block: a wait takes the record current when it is queued.
    _streams: dict = {}

    def __init__(self, device, *inputs):
        self.device, self.inputs = torch.device(device), inputs
        self.main = self.side = self.context = None
        self.switched = False  # made the side stream current with set_stream (else through `context`, or not at all)

    def __enter__(self):
        if self.device.type == "cuda":
            self.main = torch.cuda.current_stream(self.device)
            cached = self._streams.get(self.device)
            if cached is None:
                cached = self._streams[self.device] = (torch.cuda.Stream(self.device, priority=-100),
                                                       torch.cuda.Event(), torch.cuda.Event())
            self.side, main_done, self.side_done = cached
            main_done.record(self.main)
            self.side.wait_event(main_done)
            # (set_stream rather than the torch.cuda.stream context: the block runs on the current device, and the
            # context's device bookkeeping is ~10-20 us of host time per use on an H100 host.)
            if torch.cuda.current_device() == self.device.index:
                torch.cuda.set_stream(self.side)
                self.switched = True
            else:
                self.context = torch.cuda.stream(self.side)
                self.context.__enter__()
        return self

    def __exit__(self, *exc):
        if self.switched:
            torch.cuda.set_stream(self.main)
        elif self.context is not None:
            self.context.__exit__(*exc)
        self.context, self.switched = None, False
        return False

    def join(self) -> None:
        """The current (main) stream waits for the block (whose results it may then use)."""
        if self.side is not None:
            self.side_done.record(self.side)
            self.main.wait_event(self.side_done)
        self.inputs = ()  # (referenced until here: see the class docstring)


def ring_forward(s_loc, decay, sp: SequenceParallelContext, pending_recv):
    """LASP ring step: S_in(r) arrives from rank r-1; S_out(r) = a_r S_in(r) + S_loc(r) leaves for rank r+1.
    Only this combine and the hop are serial across ranks.

    s_loc: [B, H, K, V] float32; decay: a_r as [B, H, 1, 1] float32, None when a document starts on this rank
    (a_r = 0); pending_recv: what `post_recv_from_prev` returned (posted early). Returns S_in(r), None on rank 0
    (zeros).
    """
    s_in = _received(pending_recv, sp)
    if sp.next_rank is not None:
        _send_later(_combine(s_loc, decay, s_in), sp.rank + 1, sp)
    return s_in


def ring_backward(ds_direct, decay, sp: SequenceParallelContext, pending_recv):
    """The ring the other way: dS_out(r) arrives from rank r+1 and dS_in(r) = dS_direct(r) + a_r dS_out(r)
    leaves for rank r-1. ds_direct: [B, H, K, V] float32 (zeros when no state is carried into this rank);
    pending_recv: what `post_recv_from_next` returned. Returns dS_out(r), None on the last rank (zeros)."""
    ds_out = _received(pending_recv, sp)
    if sp.prev_rank is not None:
        _send_later(_combine(ds_direct, decay, ds_out), sp.rank - 1, sp)
    return ds_out


def connect_neighbours(sp: SequenceParallelContext) -> None:
    """One ring step each way on a one-element state: the ring's own sends and receives, once.

    NCCL connects peers (and allocates their buffers, outside PyTorch's allocator) at the first send or
    receive between them. Left to the first layer, the backward direction's connection is made in the middle of
    the backward pass of a long sequence, when the GPU is full: NCCL then fails with "Cuda failure 2 'out of
    memory'" (seen on tnl-1b at 256K tokens per GPU). On gloo it costs next to nothing. Collective over the SP
    group."""
    if sp.world_size == 1:
        return
    nccl = dist.get_backend(sp.group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    state, decay = torch.zeros(1, 1, 1, 1, device=device), torch.zeros(1, 1, 1, 1, device=device)
    ring_forward(state, decay, sp, post_recv_from_prev(state.shape, device, sp))
    ring_backward(state, decay, sp, post_recv_from_next(state.shape, device, sp))
    wait_sends(sp)
    if sp.direct is not None:
        _gather_states(state, sp)  # (the all-gather mode's connections)
    if nccl:
        torch.cuda.current_stream().synchronize()


def _gather_states(x: torch.Tensor, sp: SequenceParallelContext) -> torch.Tensor:
    """`all_gather_stacked` of a float32 state, through the direct NCCL communicator where the context has one."""
    if sp.direct is None:
        return all_gather_stacked(x, sp)
    x = x.contiguous()
    out = x.new_empty(sp.world_size * x.numel())
    sp.direct.all_gather(out, x.view(-1))
    return out.view(sp.world_size, *x.shape)


def allgather_forward(s_loc, decay, sp: SequenceParallelContext, shared_decay=None):
    """LASP-2: one all_gather of every rank's (S_loc, a); rank r combines the prefix
    S_in(0) = 0, S_in(s+1) = a_s S_in(s) + S_loc(s). s_loc [B, H, K, V] float32; decay [B, H, 1, 1] or None
    (a_r = 0). shared_decay: a_s of every rank s >= 1 where the caller knows it is one tensor on every rank (dense
    input, no or per-head decay; a_0 is never used): then only the states are gathered (no concatenation, and the
    gathered decays are that tensor). Returns (S_in(r) or None for zeros, every a_s [W, B, H, 1, 1])."""
    W, r = sp.world_size, sp.rank
    if shared_decay is None and decay is None:
        decay = s_loc.new_zeros(*s_loc.shape[:2], 1, 1)
    if W == 1:
        return None, (decay if shared_decay is None else shared_decay)[None]
    if shared_decay is not None:
        s_locs = _gather_states(s_loc, sp)
        decays = shared_decay.expand(W, *shared_decay.shape)
    else:
        n_state = s_loc.numel()
        gathered = _gather_states(torch.cat([s_loc.reshape(-1), decay.reshape(-1)]), sp)
        s_locs = gathered[:, :n_state].view(W, *s_loc.shape)
        decays = gathered[:, n_state:].view(W, *decay.shape)
    s_in = None
    for s in range(r):
        s_in = _combine(s_locs[s], decays[s], s_in)
    return s_in, decays


def allgather_backward(ds_direct, decays, sp: SequenceParallelContext) -> torch.Tensor | None:
    """LASP-2 backward: one all_gather of every rank's dS_direct [B, H, K, V]; rank r suffix-combines
    dS_in(s) = dS_direct(s) + a_s dS_in(s+1) from the last rank down to r+1. Returns dS_out(r) = dS_in(r+1),
    None on the last rank (zeros)."""
    W, r = sp.world_size, sp.rank
    if W == 1:
        return None
    directs = _gather_states(ds_direct, sp)
    ds = None
    for s in range(W - 1, r, -1):
        ds = _combine(directs[s], decays[s], ds)
    return ds


def all_reduce_sum(x: torch.Tensor, sp: SequenceParallelContext) -> torch.Tensor:
    """The sum over the SP group of x, on every rank (a new tensor)."""
    y = x.contiguous().clone()
    if sp.world_size > 1:
        dist.all_reduce(y, group=sp.group)
    return y



class _GatherSequence(torch.autograd.Function):
    """[B, T_local, ...] -> [B, W * T_local, ...] in rank order; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, sp):
        ctx.sp = sp
        stacked = all_gather_stacked(x.transpose(0, 1), sp)        # [W, T_local, B, ...]
        return stacked.flatten(0, 1).transpose(0, 1)

    @staticmethod
    def backward(ctx, dy):
        sp = ctx.sp
        B, T, *rest = dy.shape
        per_rank = dy.transpose(0, 1).reshape(sp.world_size, T // sp.world_size, B, *rest)
        return reduce_scatter_stacked(per_rank, sp).transpose(0, 1), None


def gather_sequence(x: torch.Tensor, sp: SequenceParallelContext) -> torch.Tensor:
    """All ranks' slices of x [B, T_local, ...] concatenated along T, with autograd.

    The gradient that reaches rank r's slice is the sum of all ranks' gradients for it.
    """
    if sp.world_size == 1:
        return x
    return _GatherSequence.apply(x, sp)


def all_gather_object_ints(values: list[int], sp: SequenceParallelContext, device) -> list[list[int]]:
    """Every rank's list of ints (same length on every rank), for cross-rank shape checks."""
    x = torch.tensor(values, dtype=torch.int64, device=device)
    return all_gather_stacked(x, sp).tolist()
