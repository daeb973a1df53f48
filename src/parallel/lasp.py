"""Sequence-parallel linear attention (LASP ring and LASP-2 all-gather), exact.

Shapes: B batch, L = T_local tokens on this rank, H heads, K key/query dim, V value dim,
W ranks in the SP group, N packed documents. Rank r holds tokens [r*L, (r+1)*L) of the sequence.

Decomposition (DESIGN.md, "Sequence parallel"). Per (b, h), with G_t the cumulative log-decay
from the rank's first token (inclusive):
    local pass, zero carried state:  o_loc, S_loc        (any backend, `local_impl`)
    a_r   = exp(G_L)  (0 when a document starts on the rank, its first token included)
    S_in(r) = a_{r-1} S_in(r-1) + S_loc(r-1),   S_in(0) = 0
    o_t   = o_loc_t + scale * exp(G_t) q_t S_in(r)    for the tokens before the first document
                                                      start on the rank (all of them if none)
The caller's initial state enters through the local pass of the rank where its document starts
(rank 0 without packing), so the carry itself always starts from zero. Only S_in crosses ranks:
`comm.ring_carry` (state hops r -> r+1; the local pass runs first, so only the combine and the
hop are serial) or `comm.allgather_carry` (one all_gather of every (S_loc, a), prefix combined
on each rank). Both are autograd Functions; the correction, the local pass and the final-state
assembly are plain autograd.

Gradients: for tensors every rank passes whole (g of shape [H], initial_state) each rank
returns only its own contribution; the owner sums them across the SP group.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lasp_hf.parallel import comm
from lasp_hf.parallel.context import SP_MODES, SequenceParallelContext, as_sp_context


@dataclass(frozen=True)
class RankPlan:
    """Where documents fall on this rank (the whole row is one document when not packed).

    local_bounds: cumulative local segment boundaries [0, ..., L] (None when not packed).
    seg_docs: the document index of each local segment (packed only).
    carried_len: number of leading tokens that continue a document begun on an earlier rank
        (0: the rank starts a document at its first token); the carried state applies to them.
    ending: (segment, document) for each document whose last token is on this rank.
    empty_docs: zero-length documents whose (unchanged) initial state this rank reports.
    """

    local_bounds: list | None
    seg_docs: list
    carried_len: int
    ending: list
    empty_docs: list
    num_docs: int
    length: int

    @property
    def passes_through(self) -> bool:
        """The state entering the rank is carried to its end (no document starts on it): a_r != 0."""
        return self.carried_len == self.length


def dense_plan(L: int, rank: int, world_size: int) -> RankPlan:
    return RankPlan(None, [], L if rank > 0 else 0, [(0, None)] if rank == world_size - 1 else [], [], 0, L)


def packed_plan(bounds: list, L: int, rank: int, world_size: int) -> RankPlan:
    """The plan for rank `rank` of a packed sequence with global boundaries `bounds` [N + 1]."""
    start, end = rank * L, (rank + 1) * L
    last_rank = rank == world_size - 1
    num_docs = len(bounds) - 1
    local_bounds, seg_docs, ending, empty_docs = [0], [], [], []
    # Documents that may touch [start, end]: from the one holding `start` to the last one starting
    # at or before `end` (zero-length documents sitting on `end` belong to the next rank).
    first = max(bisect.bisect_right(bounds, start) - 1, 0)
    first = bisect.bisect_left(bounds, bounds[first])  # back up over zero-length documents at `start`
    for n in range(min(first, num_docs), num_docs):
        s, e = bounds[n], bounds[n + 1]
        if s > end or (s == end and not last_rank):
            break
        if s == e:
            if start <= s < end or (last_rank and s == end):
                empty_docs.append(n)
            continue
        lo, hi = max(s, start), min(e, end)
        if lo >= hi:
            continue
        seg_docs.append(n)
        local_bounds.append(hi - start)
        if e <= end:
            ending.append((len(seg_docs) - 1, n))
    carried_len = local_bounds[1] if bounds[seg_docs[0]] < start else 0
    return RankPlan(local_bounds, seg_docs, carried_len, ending, empty_docs, num_docs, L)


def _rank_plan(sp: SequenceParallelContext, cu_seqlens, L: int) -> RankPlan:
    if cu_seqlens is None:
        return dense_plan(L, sp.rank, sp.world_size)
    cached = sp.plan_cache
    # The same cu_seqlens tensor is passed to every layer: read it back to the host once.
    if cached is not None and cached[0] is cu_seqlens and cached[1] == cu_seqlens._version and cached[2] == L:
        return cached[3]
    bounds = cu_seqlens.tolist()
    total = L * sp.world_size
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(
            f"under SP, cu_seqlens describes the full packed sequence: it must start at 0, never decrease and end "
            f"at T_local * W = {L} * {sp.world_size} = {total}; got {bounds[:4]}...{bounds[-2:]}"
        )
    plan = packed_plan(bounds, L, sp.rank, sp.world_size)
    sp.plan_cache = (cu_seqlens, cu_seqlens._version, L, plan)
    return plan


def _check_across_ranks(sp: SequenceParallelContext, q, v, g, initial_state, output_final_state, packed, mode):
    """Every rank must pass the same shapes and options; checked once per distinct signature."""
    B, L, H, K = q.shape
    g_mode = 0 if g is None else g.dim()
    signature = (B, L, H, K, v.shape[-1], g_mode, initial_state is not None, bool(output_final_state), packed,
                 SP_MODES.index(mode))
    if signature in sp.checked_signatures:
        return
    device = q.device if dist.get_backend(sp.group) == "nccl" else torch.device("cpu")
    everyone = comm.all_gather_object_ints([int(x) for x in signature], sp, device)
    if any(tuple(row) != tuple(everyone[0]) for row in everyone):
        names = "(B, T_local, H, K, V, g.dim(), initial_state given, output_final_state, packed, mode)"
        raise ValueError(
            "sequence-parallel ranks passed different shapes or options; every rank must pass the same B, "
            f"T_local, H, K, V and options {names}; per rank: {everyone}"
        )
    sp.checked_signatures.add(signature)


def _check_state(initial_state, expected, packed):
    if initial_state is None:
        return
    if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
        got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
        what = "[N, H, K, V] (N documents in cu_seqlens)" if packed else "[B, H, K, V]"
        raise ValueError(f"initial_state must be {what} = {expected}, got {got}")


def _cumulative_decay(g, B: int, n: int, H: int, device) -> torch.Tensor:
    """G_t for the rank's first n tokens: float32 [B, n, H] (zeros when g is None)."""
    if g is None:
        return torch.zeros(B, n, H, device=device)
    if g.dim() == 1:
        steps = torch.arange(1, n + 1, device=device, dtype=torch.float32)
        return (g.float()[None, None, :] * steps[None, :, None]).expand(B, n, H)
    return g[:, :n].float().cumsum(1)


def sp_linear_attention(q, k, v, g=None, *, scale: float, initial_state=None, output_final_state=False,
                        cu_seqlens=None, sp_group, sp_mode="ring", local_impl):
    """`linear_attention` on this rank's slice of the sequence (see `lasp_hf.linear_attention`).

    Args:
        q, k: [B, L, H, K]; v: [B, L, H, V]: this rank's contiguous slice, rank order = sequence order.
        g: None, [H] (the same on every rank) or [B, L, H] (this rank's slice).
        initial_state: [B, H, K, V], or [N, H, K, V] with cu_seqlens: the state before the whole
            sequence (before each document), the same on every rank.
        cu_seqlens: int [N + 1], B == 1: boundaries of the FULL packed sequence (T = L * W), the
            same on every rank.
        sp_group: a SequenceParallelContext or a ProcessGroup (wrapped; mode from sp_mode).
        sp_mode: "ring" or "allgather".
        local_impl: backend module with `chunk_linear_attention` (autograd through it).

    Returns:
        o: [B, L, H, V] in v's dtype; final_state: float32 [B, H, K, V] ([N, H, K, V] packed), the
        state after the whole sequence (each document), the same on every rank; or None.
    """
    if sp_mode not in SP_MODES:
        raise ValueError(f"sp_mode must be one of {SP_MODES}, got {sp_mode!r}")
    sp = as_sp_context(sp_group, sp_mode)
    B, L, H, K = q.shape
    V = v.shape[-1]
    packed = cu_seqlens is not None
    _check_across_ranks(sp, q, v, g, initial_state, output_final_state, packed, sp_mode)
    if packed and B != 1:
        raise ValueError(f"cu_seqlens packs documents along T and needs B == 1, got B = {B}")
    plan = _rank_plan(sp, cu_seqlens, L)
    _check_state(initial_state, (plan.num_docs if packed else B, H, K, V), packed)

    # The carried state arrives into a buffer posted before the local pass (ring).
    s_like = q.new_empty(B, H, K, V, dtype=torch.float32)
    pending = comm.post_recv_from_prev(s_like, sp) if sp_mode == "ring" and sp.world_size > 1 else None

    # Local pass: the caller's initial state enters only where its document starts.
    if packed:
        local_h0 = None
        if initial_state is not None:
            rows = initial_state.index_select(0, torch.tensor(plan.seg_docs, device=q.device))
            if plan.carried_len:
                rows = torch.cat([torch.zeros_like(rows[:1]), rows[1:]])
            local_h0 = rows
        local_cu = torch.tensor(plan.local_bounds, dtype=torch.int32, device=q.device)
    else:
        local_h0 = initial_state if sp.rank == 0 else None
        local_cu = None
    o_loc, local_finals = local_impl.chunk_linear_attention(
        q, k, v, g, scale=scale, initial_state=local_h0, output_final_state=True, cu_seqlens=local_cu,
    )
    s_loc = local_finals[-1:] if packed else local_finals

    n = plan.carried_len
    G = _cumulative_decay(g, B, n, H, q.device) if n else None
    decay = G[:, -1].exp() if plan.passes_through else q.new_zeros(B, H, dtype=torch.float32)

    with_end = sp_mode == "allgather" and not packed and output_final_state
    if sp_mode == "ring":
        o_anchor, s_in = comm.ring_carry(o_loc, s_loc, decay, sp, pending)
        s_end = None
    else:
        o_anchor, s_in, s_end = comm.allgather_carry(o_loc, s_loc, decay, sp, with_end=with_end)

    final = None
    if output_final_state:
        if with_end:
            final = s_end
        else:
            final = _final_states(plan, local_finals, s_in, G, initial_state, packed, sp)
            o_anchor, final = comm.all_reduce_sum(o_anchor, final, sp)

    if n == 0:
        # o_anchor is a view returned by a custom Function; hand back a tensor the caller may modify.
        return o_anchor.clone(), final
    corr = scale * torch.einsum("bthk,bhkv->bthv", q[:, :n].float() * G.exp()[..., None], s_in)
    head = (o_anchor[:, :n].float() + corr).to(o_anchor.dtype)
    o = head if n == L else torch.cat([head, o_anchor[:, n:]], dim=1)
    return o, final


def _final_states(plan: RankPlan, local_finals, s_in, G, initial_state, packed, sp):
    """This rank's share of the final states, zeros elsewhere: [B, H, K, V] or [N, H, K, V]."""
    def ending_state(seg):
        state = local_finals[seg:seg + 1] if packed else local_finals
        if seg == 0 and plan.carried_len:
            # The document began on an earlier rank: add the carried state, decayed over its tokens here.
            state = G[:, -1].exp()[..., None, None] * s_in + state
        return state

    if not packed:
        return ending_state(0) if plan.ending else torch.zeros_like(s_in)
    H, K, V = s_in.shape[1:]
    rows, index = [], []
    for seg, doc in plan.ending:
        rows.append(ending_state(seg))
        index.append(doc)
    for doc in plan.empty_docs:
        rows.append(initial_state[doc:doc + 1].float() if initial_state is not None else s_in.new_zeros(1, H, K, V))
        index.append(doc)
    out = s_in.new_zeros(plan.num_docs, H, K, V)
    if rows:
        out = out.index_copy(0, torch.tensor(index, device=s_in.device), torch.cat(rows))
    return out
