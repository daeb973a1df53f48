"""Every collective that sequence parallelism uses, one small function per pattern.

Shapes: B batch, H heads, K key dim, V value dim, W ranks in the SP group. States are float32
[B, H, K, V]; decays are float32 [B, H].

Autograd: each pattern that gradients cross is a `torch.autograd.Function` whose backward is the
adjoint collective (all_gather <-> reduce_scatter, send to r+1 <-> receive from r+1, all_reduce
<-> all_reduce). Under SPMD a backward collective only completes if every rank of the group runs
it, but autograd only runs the nodes the local loss reaches; a rank whose output does not depend
on the carried state (rank 0, say) would skip its half and the others would hang. So the
state-carrying functions take an `anchor` (the op's output on its way out) and hand it back as a
view: every rank whose loss uses its output runs the collective's backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lasp_hf.parallel.context import SequenceParallelContext

# torch >= 2.10 renamed the flat collectives; both names take the same arguments.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---- plain collectives (no autograd) -------------------------------------------------------------

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


def post_recv_from_prev(like: torch.Tensor, sp: SequenceParallelContext):
    """Post the receive of the state that rank r-1 will send; returns (buffer, work) or None on rank 0.

    Posting it before the local pass lets the sender's send complete as soon as it is issued.
    """
    if sp.prev_rank is None:
        return None
    buf = torch.empty_like(like)
    return buf, dist.irecv(buf, src=sp.prev_rank, group=sp.group)


def send_to_next(x: torch.Tensor, sp: SequenceParallelContext):
    """Asynchronous send of x to rank r+1 (None on the last rank); the caller waits on the work."""
    if sp.next_rank is None:
        return None
    return dist.isend(x.contiguous(), dst=sp.next_rank, group=sp.group)


def send_to_prev(x: torch.Tensor, sp: SequenceParallelContext):
    """Asynchronous send of x to rank r-1 (None on rank 0); the caller waits on the work."""
    if sp.prev_rank is None:
        return None
    return dist.isend(x.contiguous(), dst=sp.prev_rank, group=sp.group)


def recv_from_next(like: torch.Tensor, sp: SequenceParallelContext) -> torch.Tensor | None:
    """Blocking receive of a tensor shaped like `like` from rank r+1 (None on the last rank)."""
    if sp.next_rank is None:
        return None
    buf = torch.empty_like(like)
    dist.irecv(buf, src=sp.next_rank, group=sp.group).wait()
    return buf


# ---- ring carry (LASP) ---------------------------------------------------------------------------

class _RingCarry(torch.autograd.Function):
    """S_in(r) from rank r-1, then S_out(r) = a_r * S_in(r) + S_loc(r) to rank r+1.

    Backward runs the ring the other way: dS_out(r) arrives from rank r+1, and rank r sends
    dS_in(r) = (gradient of its own uses of S_in) + a_r * dS_out(r) to rank r-1;
    dS_loc(r) = dS_out(r), da_r = <dS_out(r), S_in(r)>.
    """

    @staticmethod
    def forward(ctx, anchor, s_loc, decay, sp, pending_recv):
        if pending_recv is None:
            s_in = torch.zeros_like(s_loc)
        else:
            s_in, work = pending_recv
            work.wait()
        if sp.next_rank is not None:
            s_out = decay[..., None, None] * s_in + s_loc
            send_to_next(s_out, sp).wait()
        ctx.sp = sp
        ctx.save_for_backward(s_in, decay)
        return anchor.view_as(anchor), s_in

    @staticmethod
    def backward(ctx, d_anchor, ds_in):
        s_in, decay = ctx.saved_tensors
        sp = ctx.sp
        ds_out = recv_from_next(ds_in, sp)
        if ds_out is None:  # the last rank's outgoing state is not used by anyone
            ds_out = torch.zeros_like(ds_in)
        ds_in_total = ds_in + decay[..., None, None] * ds_out
        work = send_to_prev(ds_in_total, sp)
        d_decay = (ds_out * s_in).sum((-2, -1))
        if work is not None:
            work.wait()
        return d_anchor, ds_out, d_decay, None, None


def ring_carry(anchor, s_loc, decay, sp: SequenceParallelContext, pending_recv=None):
    """The LASP ring step for one layer: returns (anchor, S_in(r)).

    s_loc: [B, H, K, V] float32, the state this rank alone produces at its end; decay: [B, H]
    float32, a_r (0 where a sequence starts on this rank); pending_recv: what
    `post_recv_from_prev` returned (posted before the local pass), or None to receive now.
    """
    if sp.world_size == 1:
        return anchor, torch.zeros_like(s_loc)
    if pending_recv is None:
        pending_recv = post_recv_from_prev(s_loc, sp)
    return _RingCarry.apply(anchor, s_loc, decay, sp, pending_recv)


# ---- all-gather carry (LASP-2) -------------------------------------------------------------------

def _prefix_states(s_locs, decays, upto):
    """S_in(0) = 0, S_in(s+1) = a_s S_in(s) + S_loc(s); returns [S_in(0), ..., S_in(upto)]."""
    states = [torch.zeros_like(s_locs[0])]
    for s in range(upto):
        states.append(decays[s][..., None, None] * states[-1] + s_locs[s])
    return states


class _AllGatherCarry(torch.autograd.Function):
    """All ranks gather every (S_loc(s), a_s); rank r combines the prefix S_in(r) (and S_in(W)).

    Backward: rank r runs the combine's adjoint over the gathered entries (a suffix combine of
    its own dS_in(r) and dS_in(W)), then one reduce_scatter hands each rank s the sum over ranks
    of the gradients of its (S_loc(s), a_s).
    """

    @staticmethod
    def forward(ctx, anchor, s_loc, decay, sp, with_end):
        W, r = sp.world_size, sp.rank
        packed = torch.cat([s_loc.reshape(-1), decay.reshape(-1)])
        gathered = all_gather_stacked(packed, sp)                  # [W, B*H*K*V + B*H]
        n_state = s_loc.numel()
        s_locs = gathered[:, :n_state].view(W, *s_loc.shape)
        decays = gathered[:, n_state:].view(W, *decay.shape)
        states = _prefix_states(s_locs, decays, W if with_end else r)
        ctx.sp, ctx.with_end, ctx.n_state = sp, with_end, n_state
        ctx.save_for_backward(s_locs, decays)
        s_end = states[W] if with_end else None
        return anchor.view_as(anchor), states[r], s_end

    @staticmethod
    def backward(ctx, d_anchor, ds_in, ds_end):
        s_locs, decays = ctx.saved_tensors
        sp, W, r = ctx.sp, ctx.sp.world_size, ctx.sp.rank
        last = W if ctx.with_end else r
        states = _prefix_states(s_locs, decays, last)
        d_s_locs = torch.zeros_like(s_locs)
        d_decays = torch.zeros_like(decays)
        # dS is the gradient w.r.t. S_in(s + 1) while walking s down from last - 1 to 0.
        dS = ds_end if (ctx.with_end and ds_end is not None) else torch.zeros_like(ds_in)
        if last == r:
            dS = dS + ds_in
        for s in range(last - 1, -1, -1):
            d_s_locs[s] = dS
            d_decays[s] = (dS * states[s]).sum((-2, -1))
            dS = decays[s][..., None, None] * dS
            if s == r:
                dS = dS + ds_in
        grads = torch.cat([d_s_locs.reshape(W, -1), d_decays.reshape(W, -1)], dim=1)
        mine = reduce_scatter_stacked(grads, sp)
        d_s_loc = mine[:ctx.n_state].view_as(s_locs[0])
        d_decay = mine[ctx.n_state:].view_as(decays[0])
        return d_anchor, d_s_loc, d_decay, None, None


def allgather_carry(anchor, s_loc, decay, sp: SequenceParallelContext, with_end: bool = False):
    """The LASP-2 exchange for one layer: returns (anchor, S_in(r), S_in(W) or None).

    One all_gather of the packed (S_loc, a) of every rank; S_in(W), the state after the last
    rank, is the final state of an unpacked sequence.
    """
    if sp.world_size == 1:
        end = s_loc if with_end else None  # rank 0 starts the sequence: its local state is the final one
        return anchor, torch.zeros_like(s_loc), end
    return _AllGatherCarry.apply(anchor, s_loc, decay, sp, with_end)


# ---- all_reduce (final states) -------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, on every rank; its adjoint is the same all_reduce of dy."""

    @staticmethod
    def forward(ctx, anchor, x, sp):
        ctx.sp = sp
        y = x.contiguous().clone()
        dist.all_reduce(y, group=sp.group)
        return anchor.view_as(anchor), y

    @staticmethod
    def backward(ctx, d_anchor, dy):
        dx = dy.contiguous().clone()
        dist.all_reduce(dx, group=ctx.sp.group)
        return d_anchor, dx, None


def all_reduce_sum(anchor, x, sp: SequenceParallelContext):
    """(anchor, sum over the SP group of x) with autograd; used for the final states."""
    if sp.world_size == 1:
        return anchor, x
    return _AllReduceSum.apply(anchor, x, sp)


# ---- all_gather along the sequence (softmax layers, LASP-2H) -------------------------------------

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
