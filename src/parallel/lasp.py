"""Sequence-parallel linear attention (LASP ring and LASP-2 all-gather), exact.

Shapes: B batch, L = T_local tokens on this rank, H heads, K key/query dim, V value dim,
W ranks in the SP group, N packed documents. Rank r holds tokens [r*L, (r+1)*L) of the sequence.

Decomposition (README, "The op"; the derivation below). Per (b, h), with G_t the cumulative log-decay
from the rank's first token (inclusive):
    S_loc(r) = the state rank r alone produces at its end (a zero carried state)
    a_r      = exp(G_L)  (0 when a document starts on the rank, its first token included)
    S_in(r)  = a_{r-1} S_in(r-1) + S_loc(r-1),   S_in(0) = 0
    o_t      = o_loc_t + scale * exp(G_t) q_t S_in(r)   (tokens before the rank's first document start)
The last line is what the local kernel computes when it starts from S_in(r). So each rank runs:
  1. a state-only pass over its last document's tokens (S_loc: one K x V product per head);
  2. the exchange: `comm.ring_forward` (S_in hops r -> r+1, only the combine is serial) or
     `comm.allgather_forward` (one all_gather of every (S_loc, a), prefix combined locally);
  3. the local pass (`local_impl`, any backend) starting from S_in(r): o is exact, no correction.
Backward mirrors it: the direct gradient of S_in(r), dS_direct = scale * sum_t exp(G_t) q_t^T do_t
(+ the final-state gradient of a document ending on the rank), needs only q, do and g; the
exchange (`ring_backward` / `allgather_backward`) gives dS_out(r) = dS_in(r+1); the local
backward then runs with dS_out(r) as the gradient of its final state (on the Triton path the exchange runs on a
side stream while the local backward's dq kernel, which needs no dS_out, runs). Serial work across ranks
is the state combines and hops only. The two state-only passes run in PyTorch unless the backend
offers kernels for them (`final_state_only`, `initial_state_grad_only`; see `_segment_state`,
`_carried_state_grad`).

A decay per key channel (g [B, L, H, K], GLA / HGRN2) is the same with diagonal factors: G_t, a_r in R^K per
(b, h), S_in(r) = diag(a_{r-1}) S_in(r-1) + S_loc(r-1), o_t = o_loc_t + scale * (q_t * exp(G_t)) S_in(r); the
state-only passes and the local pass come from the backend's per-channel module (`kernels.reference_gla`,
`kernels.triton.gla_chunk`). The all-gather then sends, per rank and layer, S_loc and a_r as float32:
4 * B * H * K * (V + 1) bytes (1,056,768 at B = 1, H = 16, K = V = 128; a per-head decay sends
4 * B * H * (K * V + 1)), and the backward gathers dS_direct alone (4 * B * H * K * V bytes); the ring sends one
state each way, as for any decay.

Gradients: for tensors every rank passes whole (g of shape [H], initial_state) each rank
returns only its own contribution (zeros where it has none); the owner sums them across the SP
group. Every rank must back-propagate through o (the exchange is collective).
"""

from __future__ import annotations

import array
import bisect
import functools
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from lasp_hf.kernels.host import device_cu_seqlens, device_ints, host_bounds
from lasp_hf.parallel import comm
from lasp_hf.parallel.context import SP_MODES, SequenceParallelContext, as_sp_context


@dataclass(frozen=True)
class RankPlan:
    """Where documents fall on this rank (the whole row is one document when not packed).

    local_bounds: cumulative local segment boundaries [0, ..., L] (None when not packed).
    seg_docs: the document index of each local segment (packed only).
    carried_len: number of leading tokens that continue a document begun on an earlier rank
        (0: the rank starts a document at its first token); the carried state applies to them.
    hands_on: the rank's last document continues on the next rank (its state must be sent).
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
    hands_on: bool = False
    # Tables of the plan already copied to a device (see `on_device`).
    device_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def on_device(self, name: str, device) -> torch.Tensor:
        """One of the plan's index lists on `device`, copied once per plan without waiting for the GPU:
        "local_bounds" (int32 cu_seqlens of the local pass), "seg_docs", "ending_segs", "ending_docs",
        "empty_docs" (int64)."""
        key = (name, str(device))
        if key not in self.device_cache:
            if name == "local_bounds":
                self.device_cache[key] = device_cu_seqlens(self.local_bounds, device)
            else:
                values = {"ending_segs": [seg for seg, _ in self.ending],
                          "ending_docs": [doc for _, doc in self.ending]}.get(name)
                self.device_cache[key] = device_ints(getattr(self, name) if values is None else values, device)
        return self.device_cache[key]

    @property
    def num_segments(self) -> int:
        return 1 if self.local_bounds is None else len(self.local_bounds) - 1

    @property
    def last_start(self) -> int:
        """Local index of the first token of the rank's last segment."""
        return 0 if self.local_bounds is None else self.local_bounds[-2]

    @property
    def passes_through(self) -> bool:
        """The state entering the rank is carried to its end (no document starts on it): a_r != 0."""
        return self.carried_len == self.length


@functools.lru_cache(maxsize=64)
def dense_plan(L: int, rank: int, world_size: int) -> RankPlan:
    last = rank == world_size - 1
    return RankPlan(None, [], L if rank > 0 else 0, [(0, None)] if last else [], [], 0, L, hands_on=not last)


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
    hands_on = bounds[seg_docs[-1] + 1] > end
    return RankPlan(local_bounds, seg_docs, carried_len, ending, empty_docs, num_docs, L, hands_on)


def _rank_plan(sp: SequenceParallelContext, cu_seqlens, L: int) -> RankPlan:
    if cu_seqlens is None:
        return dense_plan(L, sp.rank, sp.world_size)
    return _checked_packed_plan(host_bounds(cu_seqlens), L, sp.rank, sp.world_size)


@functools.lru_cache(maxsize=16)
def _checked_packed_plan(bounds: tuple[int, ...], L: int, rank: int, world_size: int) -> RankPlan:
    """`packed_plan` after checking the boundaries; once per batch, since every layer (forward and backward)
    passes the same ones."""
    total = L * world_size
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(
            f"under SP, cu_seqlens describes the full packed sequence: it must start at 0, never decrease and end "
            f"at T_local * W = {L} * {world_size} = {total}; got {bounds[:4]}...{bounds[-2:]}"
        )
    return packed_plan(bounds, L, rank, world_size)


def _bounds_digest(bounds) -> tuple[int, int]:
    """(number of boundaries, CRC-32 of their values): equal on ranks that pass the same cu_seqlens."""
    if bounds is None:
        return (0, 0)
    return (len(bounds), zlib.crc32(array.array("q", bounds).tobytes()))


# Signatures remembered per SP context before the set is emptied (a packed batch adds one per step).
_MAX_SIGNATURES = 1024


def _check_across_ranks(sp: SequenceParallelContext, q, v, g, initial_state, output_final_state, bounds, mode):
    """Every rank must pass the same shapes, options and packed-sequence boundaries (`bounds`, None when not
    packed; a digest of them is compared). Checked once per distinct signature (a model's layers, forward and
    backward, pass the same one): one small all_gather. Its result is read on the host (a wait for the GPU on
    NCCL) the first time a shape is seen; the boundaries of later packed batches of that shape are compared on the
    GPU instead, with an asynchronous device assert, so a packed batch costs no host sync."""
    B, L, H, K = q.shape
    g_mode = 0 if g is None else g.dim()
    shapes = (B, L, H, K, v.shape[-1], g_mode, initial_state is not None, bool(output_final_state),
              bounds is not None, SP_MODES.index(mode))
    signature = (*shapes, *_bounds_digest(bounds))
    if signature in sp.checked_signatures:
        return
    nccl = dist.get_backend(sp.group) == "nccl"
    device = q.device if nccl else torch.device("cpu")
    if nccl and ("shapes", *shapes) in sp.checked_signatures:
        everyone = comm.all_gather_stacked(device_ints(list(signature), device), sp)
        torch._assert_async((everyone == everyone[:1]).all(), "lasp_hf: sequence-parallel ranks passed different "
                            "cu_seqlens; every rank must pass the boundaries of the same full packed sequence")
    else:
        everyone = comm.all_gather_object_ints([int(x) for x in signature], sp, device)
        if any(tuple(row[:10]) != tuple(everyone[0][:10]) for row in everyone):
            names = "(B, T_local, H, K, V, g.dim(), initial_state given, output_final_state, packed, mode)"
            raise ValueError(
                "sequence-parallel ranks passed different shapes or options; every rank must pass the same B, "
                f"T_local, H, K, V and options {names}; per rank: {[row[:10] for row in everyone]}"
            )
        if any(tuple(row[10:]) != tuple(everyone[0][10:]) for row in everyone):
            raise ValueError(
                "sequence-parallel ranks passed different cu_seqlens; every rank must pass the boundaries of the "
                "same full packed sequence. Per rank (number of boundaries, CRC-32 of their values): "
                f"{[tuple(row[10:]) for row in everyone]}; this rank ({sp.rank}) has {_bounds_preview(bounds)}"
            )
    if len(sp.checked_signatures) >= _MAX_SIGNATURES:
        sp.checked_signatures.clear()
    sp.checked_signatures.update({signature, ("shapes", *shapes)})


def _bounds_preview(bounds) -> str:
    if bounds is None:
        return "none (not packed)"
    return str(list(bounds)) if len(bounds) <= 8 else f"{list(bounds[:4])}...{list(bounds[-2:])}"


def _check_state(initial_state, expected, packed):
    if initial_state is None:
        return
    if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
        got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
        what = "[N, H, K, V] (N documents in cu_seqlens)" if packed else "[B, H, K, V]"
        raise ValueError(f"initial_state must be {what} = {expected}, got {got}")


# Tokens per block in the state-only passes (bounds their float32 temporaries).
_BLOCK_TOKENS = 8192


def _outer_sum(a, b):
    """sum_t a_t^T b_t per (batch, head): a [B, t, H, Da], b [B, t, H, Db] -> float32 [B, H, Da, Db].

    Half-precision inputs on CUDA stay half precision in the product (float32 accumulation and
    result, as in the kernels); elsewhere the product runs in float32.
    """
    if a.device.type == "cuda" and a.dtype in (torch.bfloat16, torch.float16) and a.dtype == b.dtype:
        B, t, H, Da = a.shape
        lhs = a.permute(0, 2, 3, 1).reshape(B * H, Da, t)
        rhs = b.permute(0, 2, 1, 3).reshape(B * H, t, b.shape[-1])
        try:
            return torch.bmm(lhs, rhs, out_dtype=torch.float32).view(B, H, Da, -1)
        except (TypeError, RuntimeError):  # torch without bmm(..., out_dtype=)
            pass
    return torch.einsum("bthk,bthv->bhkv", a.float(), b.float())


def _weighted_outer_sum(a, b, weights, lo: int, hi: int):
    """sum_{t in [lo, hi)} (w_t a_t)^T b_t, float32 [B, H, Da, Db]; weights: float32 [B, hi - lo, H] or None."""
    B, _, H, Da = a.shape
    out = a.new_zeros(B, H, Da, b.shape[-1], dtype=torch.float32)
    for i in range(lo, hi, _BLOCK_TOKENS):
        j = min(i + _BLOCK_TOKENS, hi)
        ab = a[:, i:j]
        if weights is not None:
            w = weights[:, i - lo:j - lo]
            ab = (ab.float() * (w if w.dim() == 4 else w[..., None])).to(a.dtype)
        out += _outer_sum(ab, b[:, i:j])
    return out


def _segment_state(k, v, g, lo: int, hi: int, h0, local_impl=None):
    """The state after tokens [lo, hi) of this rank from h0 (None: zeros), float32 [B, H, K, V]:
    exp(sum g) h0 + sum_t exp(sum_{u > t} g_u) k_t^T v_t (sums over [lo, hi)).

    A backend may provide it as `final_state_only(k, v, g, *, initial_state)` (a state-only kernel).
    """
    hook = getattr(local_impl, "final_state_only", None)
    if hook is not None:
        g_part = g[:, lo:hi] if g is not None and g.dim() >= 3 else g
        return hook(k[:, lo:hi], v[:, lo:hi], g_part, initial_state=h0).float()
    B, _, H, _ = k.shape
    n = hi - lo
    if g is None:
        weights, total = None, None
    elif g.dim() == 1:
        steps = torch.arange(n - 1, -1, -1, device=k.device, dtype=torch.float32)
        # The last token's weight is exp(0) = 1 even for g = -inf (a restart), where g * 0 would be NaN.
        log_weights = (g.float()[None, None, :] * steps[None, :, None]).masked_fill(steps[None, :, None] == 0, 0.0)
        weights = log_weights.exp().expand(B, n, H)
        total = (g.float() * n).exp().expand(B, H)
    else:
        # Reverse cumulative sums from the end: accurate where the weights are largest.
        rev = g[:, lo:hi].float().flip(1).cumsum(1).flip(1)                       # sum_{u >= t}
        weights = torch.cat([rev[:, 1:], torch.zeros_like(rev[:, :1])], dim=1).exp()  # sum_{u > t}
        total = rev[:, 0].exp()
    state = _weighted_outer_sum(k, v, weights, lo, hi)
    if h0 is not None:
        state += h0.float() * (_state_factor(total) if total is not None else 1.0)
    return state


def _carried_state_grad(q, do, g, n: int, scale: float, local_impl=None, reuse=None, need_decay: bool = True):
    """scale * sum_{t < n} exp(G_t) q_t^T do_t (G inclusive from the rank's start), float32 [B, H, K, V],
    and exp(G_{n-1}) [B, H] ([B, H, K] for a decay per key channel; None when g is None or not need_decay).

    A backend may provide the first as `initial_state_grad_only(q, do, g, *, scale)`: the gradient
    of sum(o * do) with respect to the initial state, which needs neither k nor v; or, for dense
    input (n = L), through the forward's `reuse` object, which keeps its per-segment parts for the
    local backward.
    """
    B, L, H, _ = q.shape
    hook = getattr(local_impl, "initial_state_grad_only", None)
    if hook is not None:
        g_part = g[:, :n] if g is not None and g.dim() >= 3 else g
        if reuse is not None and n == L:
            ds = reuse.initial_state_grad(q, do, g, scale)
        else:
            ds = hook(q[:, :n], do[:, :n], g_part, scale=scale).float()
        if g is None or not need_decay:
            return ds, None
        total = (g.float() * n).expand(B, H) if g.dim() == 1 else g[:, :n].float().sum(1)
        return ds, total.exp()
    if g is None:
        G = None
    elif g.dim() == 1:
        G = g.float()[None, None, :] * torch.arange(1, n + 1, device=q.device, dtype=torch.float32)[None, :, None]
        G = G.expand(B, n, H)
    else:
        G = g[:, :n].float().cumsum(1)
    ds = _weighted_outer_sum(q, do, G.exp() if G is not None else None, 0, n)
    return scale * ds, (G[:, -1].exp() if G is not None else None)


def _state_factor(decay):
    """A decay [B, H] (per head) or [B, H, K] (per key channel) as a factor on [B, H, K, V] states."""
    return decay[..., None, None] if decay.dim() == 2 else decay[..., None]


def _rank_decay(g, B: int, L: int, H: int, device):
    """a_r = exp(sum of g over the rank's L tokens), float32 [B, H, 1, 1] (a factor on states; [B, H, K, 1] for
    a decay per key channel)."""
    if g is None:
        key = (B, H, str(device))
        ones = _ONES.get(key)
        if ones is None:  # (never written in place: a constant shared by every layer and step)
            ones = torch.ones(B, H, 1, 1, device=device)
            if not _capturing(device):
                _ONES[key] = ones
        return ones
    if g.dim() == 1:
        a = _head_decay(g, L)
        return a if B == 1 else a.expand(B, H, 1, 1)
    if g.dim() == 4:  # per key channel: diag(a_r), a factor [B, H, K, 1]
        return g.float().sum(1).exp().unsqueeze(-1)
    return g.float().sum(1).exp().view(B, H, 1, 1)


_ONES: dict = {}  # a_r = 1 (no decay) per (B, H, device)

# exp(g * L) of per-head decays g [H]: the same tensor for every layer of a model and every step (lightning
# attention's fixed slopes), two small kernels and ~80 us of host time per call on a slow host. Keyed on the tensor
# itself (kept alive here, so its address is not reused) and its version counter (in-place updates).
_HEAD_DECAYS: dict = {}


def _head_decay(g, L: int):
    if g.requires_grad:  # a learned decay: a new value every step
        return (g.view(1, -1, 1, 1).float() * L).exp()
    key = (id(g), g._version, L)
    hit = _HEAD_DECAYS.get(key)  # (g itself is kept in the entry, so its id cannot name another tensor)
    if hit is not None:
        return hit[1]
    if len(_HEAD_DECAYS) >= 64:
        _HEAD_DECAYS.clear()
    a = (g.detach().view(1, -1, 1, 1).float() * L).exp()
    if not _capturing(g.device):
        _HEAD_DECAYS[key] = (g, a)
    return a


def _capturing(device) -> bool:
    """Whether a CUDA graph is being captured on the current stream: a tensor made now is only filled when the
    graph replays, so it must not be cached for eager calls."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


@dataclass
class _Run:
    """Per-call settings handed to the autograd Function (not tensors)."""

    sp: SequenceParallelContext
    plan: RankPlan
    mode: str
    scale: float
    local_impl: object
    local_cu: torch.Tensor | None
    output_final_state: bool


def _local_initial_state(run: _Run, initial_state, s_in):
    """The local pass's initial state: S_in for the carried (first) segment, the caller's state for
    documents that start on this rank. [B, H, K, V], [segments, H, K, V] when packed, or None."""
    plan = run.plan
    if plan.local_bounds is None:
        return s_in if plan.carried_len else initial_state
    if initial_state is None and not plan.carried_len:
        return None
    if initial_state is not None:
        rows = initial_state.index_select(0, plan.on_device("seg_docs", initial_state.device)).float()
    else:
        rows = s_in.new_zeros(plan.num_segments, *s_in.shape[1:])
    if plan.carried_len:
        rows = torch.cat([s_in, rows[1:]])
    return rows


def _handed_on_state(run: _Run, k, v, g, initial_state):
    """S_loc: the state of the rank's last segment at the rank's end, from a zero start when that
    segment is the carried one (a_r then carries S_in), else from its document's initial state."""
    plan = run.plan
    h0 = None
    if not (plan.num_segments == 1 and plan.carried_len) and initial_state is not None:
        h0 = initial_state if plan.local_bounds is None else initial_state[plan.seg_docs[-1]:plan.seg_docs[-1] + 1]
    return _segment_state(k, v, g, plan.last_start, plan.length, h0, run.local_impl)


def _final_states(plan: RankPlan, finals, initial_state, num_rows: int):
    """This rank's share of the final states (documents that end here), zeros elsewhere."""
    H, K, V = finals.shape[1:]
    if plan.local_bounds is None:
        return finals if plan.ending else torch.zeros_like(finals)
    rows, index = [], []
    for seg, doc in plan.ending:
        rows.append(finals[seg:seg + 1])
        index.append(doc)
    for doc in plan.empty_docs:
        rows.append(initial_state[doc:doc + 1].float() if initial_state is not None else finals.new_zeros(1, H, K, V))
        index.append(doc)
    out = finals.new_zeros(num_rows, H, K, V)
    if rows:
        out = out.index_copy(0, device_ints(index, finals.device), torch.cat(rows))
    return out


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (checkpointing, save_on_cpu) apply to what is saved now; True when this torch
    cannot tell (the memory-safe answer)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _local_pass(run: _Run, inputs, needs, reuse, record: bool):
    """The local pass from (q, k, v, g, h0): (o, finals, leaves); with `record`, through autograd from leaves
    (detached inputs that require grad where the caller's do)."""
    leaves = [x.detach().requires_grad_(needs[i] and record) if x is not None else None for i, x in enumerate(inputs)]
    with torch.enable_grad() if record else torch.no_grad():
        o, finals = run.local_impl.chunk_linear_attention(
            *leaves[:4], scale=run.scale, initial_state=leaves[4], output_final_state=True,
            cu_seqlens=run.local_cu, **({"reuse": reuse} if reuse is not None else {}),
        )
    return o, finals, leaves


class _LaspFunction(torch.autograd.Function):
    """One linear-attention layer on this rank's slice, the carried state exchanged across ranks.

    The local pass runs through the backend's `local_forward` / `local_backward` where it has them (the Triton
    kernels: no autograd inside, its tensors saved with `save_for_backward`). Otherwise it runs through the
    backend's own autograd, replayed in backward with the exchanged final-state gradient, so any backend works.
    That graph is recorded inside forward, except under saved-tensor hooks (activation checkpointing,
    `save_on_cpu`): a graph kept on ctx would hold q, k, v and o of every layer on the GPU where the hooks cannot
    reach them (64 GiB at 256K tokens per GPU for tnl-1b). There the inputs are saved with `save_for_backward`
    (so the hooks drop or offload them) and backward runs the local pass again to record it.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, run: _Run):
        sp, plan = run.sp, run.plan
        B, L, H, K = q.shape
        V = v.shape[-1]
        ring = run.mode == "ring"
        state_shape = (B, H, K, V)
        # Post the receive first: the sender's send then completes as soon as it is issued. (With direct NCCL the
        # receive is made later, on this stream, where S_in is needed: see comm._DeferredRecv.)
        pending = comm.post_recv_from_prev(state_shape, q.device, sp) if ring else None

        needs = ctx.needs_input_grad
        # Dense input on a backend that can: the per-segment states of the state-only passes are kept for the
        # local pass (forward) and the local backward, which then skip computing them again.
        make_reuse = getattr(run.local_impl, "SegmentReuse", None)
        reuse = None
        if make_reuse is not None and plan.local_bounds is None:
            reuse = make_reuse.make(q, k, v, g, accurate_states=g is not None and needs[3])
        decay = _rank_decay(g, B, L, H, q.device) if plan.passes_through else None  # None: a_r = 0
        if decay is None and not ring and g is not None and g.dim() == 4:
            # Every rank gathers the same number of floats: a_r = 0 as a per-channel [B, H, K, 1] factor.
            decay = q.new_zeros(B, H, K, 1, dtype=torch.float32)
        if plan.hands_on:
            if reuse is not None:
                s_loc = reuse.final_state(k, v, g, initial_state if not plan.carried_len else None)
            else:
                s_loc = _handed_on_state(run, k, v, g, initial_state)
        else:
            # Nothing to hand on (the next rank starts a document, or there is none): zeros where the exchange
            # still sends something.
            s_loc = q.new_zeros(state_shape, dtype=torch.float32) if not ring or sp.next_rank is not None else None
            if reuse is not None:
                # The local pass's first step needs no received state: run it now, so that waiting for the
                # state overlaps it instead of delaying it.
                reuse.prepare_states(k, v, g)
        if ring:
            s_in, decays = comm.ring_forward(s_loc, decay, sp, pending), None
        else:
            # Dense input with no or a per-head decay: every rank after the first has the same a_r, known here.
            shared = None
            if plan.local_bounds is None and (g is None or g.dim() == 1):
                shared = decay if decay is not None else _rank_decay(g, B, L, H, q.device)
            s_in, decays = comm.allgather_forward(s_loc, decay, sp, shared_decay=shared)

        h0 = _local_initial_state(run, initial_state, s_in)
        raw = getattr(run.local_impl, "local_forward", None)
        if raw is not None:
            # The local final states: for the output, and for dg when a final-state gradient comes back.
            need_final = run.output_final_state or (needs[3] and g is not None and plan.hands_on)
            o, finals, saved, info = raw(q, k, v, g, scale=run.scale, initial_state=h0, cu_seqlens=run.local_cu,
                                         need_final=need_final, need_dg=needs[3], reuse=reuse)
            ctx.save_for_backward(*saved)
            ctx.inner, ctx.info = None, info
        else:
            record = any(needs[:5]) and not _saved_tensor_hooks_active()
            o, finals, leaves = _local_pass(run, (q, k, v, g, h0), needs, reuse, record)
            if not record:
                ctx.save_for_backward(q, k, v, g, h0)
            ctx.inner, ctx.info = (o, finals, leaves) if record else None, None
        comm.wait_sends(sp)  # the state's send overlapped the local pass; it must be done before we return
        final = None
        if run.output_final_state:
            num_rows = plan.num_docs if plan.local_bounds is not None else B
            final = comm.all_reduce_sum(_final_states(plan, finals.detach(), initial_state, num_rows), sp)
        ctx.run, ctx.decay, ctx.decays, ctx.reuse = run, decay, decays, reuse
        ctx.state_shape = state_shape
        ctx.finals_shape = (plan.num_segments if plan.local_bounds is not None else B, H, K, V)
        ctx.initial_state_like = (initial_state.shape, initial_state.dtype) if initial_state is not None else None
        return o.detach() if raw is None else o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        run = ctx.run
        sp, plan = run.sp, run.plan
        ring = run.mode == "ring"
        packed = plan.local_bounds is not None
        B, L, H, _ = do.shape
        state_shape = ctx.state_shape
        reduce_dfinal = run.output_final_state and dfinal is not None
        # The ring's receive is posted first (the sender's send then completes as soon as it is issued), unless
        # the all_reduce of dfinal comes before the exchange: NCCL (eager init) runs a group's point-to-point ops
        # and collectives in one order on every rank, so a receive posted before that all_reduce would wait for a
        # send that the sender issues only after it, which waits behind the receive: a deadlock.
        pending = comm.post_recv_from_next(state_shape, do.device, sp) if ring and not reduce_dfinal else None
        if ctx.info is not None:
            saved = ctx.saved_tensors  # once: checkpointing's hooks unpack each saved tensor only once
            q, g = saved[0].view(B, L, H, -1), saved[3]  # the local pass's flat q and float32 g
            if g is not None and g.dim() == 2:
                g = g.view(B, L, H)
            elif g is not None and g.dim() == 3:  # a decay per key channel, flat [B * L, H, K]
                g = g.view(B, L, H, -1)
        else:
            if ctx.inner is None:  # recorded again now (see the class docstring)
                ctx.inner = _local_pass(run, ctx.saved_tensors, ctx.needs_input_grad, ctx.reuse, record=True)
            o, finals, leaves = ctx.inner
            ctx.inner = None
            q, g = leaves[0].detach(), (leaves[3].detach() if leaves[3] is not None else None)

        # Gradient of each local segment's final state (None: zero): d final_state of documents ending here
        # (summed over the ranks that used final_state) ...
        dht = None
        dfinal_total = None
        if reduce_dfinal:
            dfinal_total = comm.all_reduce_sum(dfinal.float(), sp)
            if plan.ending and not packed:
                dht = dfinal_total
            elif plan.ending:
                segs, docs = plan.on_device("ending_segs", do.device), plan.on_device("ending_docs", do.device)
                dht = do.new_zeros(ctx.finals_shape, dtype=torch.float32).index_add(
                    0, segs, dfinal_total.index_select(0, docs))
        # ... then the direct gradient of S_in(r), the exchange, and dS_out(r) for the handed-on state.
        ds_direct = None
        if plan.carried_len:
            # exp(G) of the carried part is needed only with a final-state gradient for it.
            ds_direct, first_decay = _carried_state_grad(q, do, g, plan.carried_len, run.scale, run.local_impl,
                                                         ctx.reuse, need_decay=dht is not None)
            if dht is not None:
                d_first = dht[:1] if packed else dht
                ds_direct = ds_direct + (_state_factor(first_decay) * d_first if first_decay is not None else d_first)
        elif ctx.reuse is not None and plan.hands_on:
            # No carried state to differentiate, but the local backward's first step can run before the wait.
            ctx.reuse.prepare_dstates(q, do, g, run.scale)
        if ds_direct is None and (not ring or sp.prev_rank is not None):
            ds_direct = do.new_zeros(state_shape, dtype=torch.float32)  # the exchange still sends something
        needs = ctx.needs_input_grad
        if ring and reduce_dfinal:
            pending = comm.post_recv_from_next(state_shape, do.device, sp)  # after the all_reduce (see above)

        def exchange(dht):
            """dS_out(r) from the later ranks (sending on what the earlier ones need), added to dht."""
            if ring:
                ds_out = comm.ring_backward(ds_direct, ctx.decay, sp, pending)
            else:
                ds_out = comm.allgather_backward(ds_direct, ctx.decays, sp)
            if not plan.hands_on or ds_out is None:
                return dht
            if not packed:
                return ds_out if dht is None else dht + ds_out
            if dht is None:
                dht = do.new_zeros(ctx.finals_shape, dtype=torch.float32)
            return torch.cat([dht[:-1], dht[-1:] + ds_out])

        if ctx.info is not None and ring and pending is None:
            # Nothing to receive (the last rank): the send goes first and dq waits for it (~25 us). Queued beside dq
            # instead, the send would get SMs only when dq's first programs end (4x H100, 128K: ~285 us later), and
            # every earlier rank waits for this send.
            dht = exchange(dht)
            comm.wait_sends(sp)
            grads = list(run.local_impl.local_backward(saved, ctx.info, do, dht, need_dh0=needs[4]))
        elif ctx.info is not None:
            # The exchange runs on a side stream while the local backward's dq kernel, which needs no dS, runs on
            # the main one: the cross-rank chain of the backward then overlaps a third of the local work instead of
            # delaying all of it (`local_backward` joins the side stream once dq is queued).
            with comm.SideStream(do.device, ds_direct, dht, ctx.decay, ctx.decays,
                                 comm.pending_buffer(pending)) as side:
                dht = exchange(dht)

            def joined():
                side.join()
                return dht

            grads = list(run.local_impl.local_backward(saved, ctx.info, do, joined, need_dh0=needs[4]))
        else:
            dht = exchange(dht)
            wanted = [i for i, x in enumerate(leaves) if x is not None and x.requires_grad]
            got = torch.autograd.grad([o, finals], [leaves[i] for i in wanted],
                                      [do, dht if dht is not None else torch.zeros_like(finals)], allow_unused=True)
            grads = [None] * 5
            for i, gr in zip(wanted, got):
                grads[i] = gr
        comm.wait_sends(sp)  # the gradient's send overlapped the local backward

        d_init = None
        if ctx.initial_state_like is not None and needs[4]:
            shape, dtype = ctx.initial_state_like
            d_init = torch.zeros(shape, dtype=torch.float32, device=do.device)
            dh0 = grads[4]
            if not packed:
                if not plan.carried_len and dh0 is not None:
                    d_init = d_init + dh0.float()
            else:
                first = 1 if plan.carried_len else 0
                if dh0 is not None and first < plan.num_segments:
                    docs = plan.on_device("seg_docs", do.device)[first:]
                    d_init = d_init.index_add(0, docs, dh0[first:].float())
                if plan.empty_docs and dfinal_total is not None:
                    docs = plan.on_device("empty_docs", do.device)
                    d_init = d_init.index_add(0, docs, dfinal_total.index_select(0, docs))
            d_init = d_init.to(dtype)
        return (grads[0] if needs[0] else None, grads[1] if needs[1] else None, grads[2] if needs[2] else None,
                grads[3] if needs[3] else None, d_init, None)


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
        local_impl: backend module with `chunk_linear_attention` (autograd through it), and
            optionally the state-only kernels `final_state_only` / `initial_state_grad_only`.

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
    _check_across_ranks(sp, q, v, g, initial_state, output_final_state, host_bounds(cu_seqlens) if packed else None,
                        sp_mode)
    if packed and B != 1:
        raise ValueError(f"cu_seqlens packs documents along T and needs B == 1, got B = {B}")
    plan = _rank_plan(sp, cu_seqlens, L)
    _check_state(initial_state, (plan.num_docs if packed else B, H, K, V), packed)
    local_cu = plan.on_device("local_bounds", q.device) if packed else None
    run = _Run(sp, plan, sp_mode, scale, local_impl, local_cu, bool(output_final_state))
    o, final = _LaspFunction.apply(q, k, v, g, initial_state, run)
    return o, (final if output_final_state else None)
