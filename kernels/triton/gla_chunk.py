"""Linear attention with a decay per key channel (GLA / HGRN2) in Triton: launchers, forward, backward, the
autograd wrapper and the public function (the kernels are in `gla_kernels`). The same stack as `chunk`, whose
plans (segments), launch settings and helpers it shares.

Shapes: B batch, T tokens, H heads, K key/query head dim, V value head dim, N sequences (B for dense input,
the packed count with cu_seqlens), S segments, BT = 16 tokens per step (32 in the segment-state passes).

Per batch row and head, g_t in R^K (natural-log, <= 0; -inf restarts that channel of the state):
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t.
Per step of BT tokens, b the cumulative log-decay from the step's start (per channel):
    o     = scale * ( A v + (q * exp(b)) S_prev ),   A_ij = sum_c q_ic k_jc exp(b_ic - b_jc)  (j <= i)
    S_new = diag(exp(b_last)) S_prev + (k * exp(b_last - b))^T v

Numerical safety (strong decays, e.g. g = -5 per token): a step is 16 tokens and its intra-step products
(A, and their gradients' dq / dk parts) take one of two forms, chosen per step and program tile:
- tensor cores, A = (q exp(b)) (k exp(-b))^T causally masked (the step's start as the reference point, as
  fla's secondary chunking bounds exp(-b) by a reference inside 16-token sub-chunks), when no channel of the
  tile restarts in the step and every channel's decay over the step is at most FACTORED_SPAN (40): each
  factor then lies within exp(+-40), far inside float32 / bf16 range (float16 inputs take bf16 operands
  there: float16 stops at 65504), split in hi + lo parts (about 16 mantissa bits). Real gates
  (logsigmoid / 16) almost always take this form.
- elementwise otherwise, with the relative decays exp(b_ic - b_jc), one column j at a time, so no exp(-cumsum)
  term exists and every exponent is <= 0. -inf is exact: b sums the finite entries only and a per-channel
  count of restarts zeroes every factor whose interval contains one.

The work is cut into segments as in `chunk` (`chunk._Plan`): (1) each segment's state from zero and its
per-channel log-decay a_s [S, H, K], (2) S_in(s) = diag(exp(a_{s-1})) S_in(s-1) + S_loc(s-1) per sequence,
(3) the output scan from S_in(s). Backward: dq (forward scan), the segments' local dS and their reverse
combine, dk (reverse scan, blocked over K) and dv (reverse scan, blocked over V). With B the cumulative
log-decay from a sequence's start (per channel),
    dL/dB_t = q_t * dq_t - k_t * dk_t   (elementwise; + S_final * dS_final summed over V at the last token),
    dg_t    = sum_{u >= t} dL/dB_u  within t's sequence, stopping before the next restart of the channel
(dg = 0 where g = -inf). The dq kernel writes q * dq in float32; the dk kernel, walking the segment backwards,
forms d = q * dq - k * dk and its sum up to the segment's end in float32 registers; what crosses segments (and
the final state's term) is added by a walk over the segments and one pass over the tokens it reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lasp_hf.kernels.triton import chunk
from lasp_hf.kernels.host import host_bounds
from lasp_hf.kernels.triton.chunk import _Plan, _flat_tokens
from lasp_hf.kernels.triton.gla_kernels import (
    gla_bwd_kernel_dg_carry,
    gla_bwd_kernel_dk,
    gla_bwd_kernel_dq,
    gla_bwd_kernel_dv,
    gla_bwd_kernel_segment_dstate,
    gla_fwd_kernel_output,
    gla_fwd_kernel_segment_state,
    gla_kernel_segment_scan,
)
from lasp_hf.kernels.triton.recurrent import recurrent_step
from lasp_hf.kernels.triton.utils import cdiv, empty, interpreting, next_pow2

STEP_TOKENS = 16
# A step whose decay, in every channel of a program's tile, is at most this much (total log-decay over its 16
# tokens) and holds no restart forms its intra-step products on the tensor cores as (q exp(b)) (k exp(-b))^T,
# every factor within exp(+-FACTORED_SPAN); other steps take the elementwise form. A negative value turns the
# tensor-core form off (tests run both forms).
FACTORED_SPAN = 40.0
# Tokens per step of the segment-state passes (step 1 and its backward, and SP's state-only passes): they form no
# intra-step products, only (k exp(b_last - b))^T v and (q exp(b))^T do, whose exponents are <= 0 at any step
# length, so they take longer steps (fewer, larger products; 32 tokens keep every tile in registers on sm_90).
STATE_STEP_TOKENS = 32
# With 16-bit inputs, the output and dv kernels multiply by the float32 state (dS) split in hi + lo 16-bit parts
# (one more product per step) instead of its 16-bit rounding: most of o (and dv) comes from that product when the
# decays are slow, so its rounding would dominate their error.
SPLIT_STATE = True
# Operands of the tensor-core form's intra-step products with 16-bit inputs: "split" (each float32 factor as
# bf16 hi + lo, three products: about 16 mantissa bits), "bf16" (one product of the bf16 roundings) or "tf32"
# (one product of float32 operands at tf32). float32 inputs always take float32 operands.
INTRA_PRECISION = "split"
# Per pass: (largest K x V state tile one program holds, in float32 elements; num_warps; num_stages). The output
# ("fwd") and dv kernels hold all of K and form the intra-step scores A once per V block, so they take the whole
# 128 x 128 state with 8 warps (one V block: A once per head and step), as the per-head forward does
# (`chunk.CONFIGS`); dq / dk ("bwd") hold all of V and split K, whose intra-step work is per channel anyway;
# "state" is the segment passes (step 1 and the SP state-only passes); "scan" the walks over segments
# (flat state elements per program). Registers at bf16, K = V = 128, compiled for sm_90 (ptxas): output kernel
# 243 (8 warps), dv 204, dq 212 and dk 247 at 64 x 128 tiles with 8 warps (with 4 warps both spill: 255 + stack),
# segment passes 165 - 215: none spills. Chosen from register counts, not from a timing sweep.
CONFIGS = {"fwd": (16384, 8, 2), "dv": (16384, 8, 2), "bwd": (8192, 8, 2), "state": (8192, 4, 2),
           "scan": (512, 4, 1)}

__all__ = ["SegmentReuse", "chunk_linear_attention", "final_state_only", "initial_state_grad_only", "local_backward",
           "local_forward", "recurrent_step"]


# ----------------------------------------------------------------------------- launchers

def _blocks_v(K: int, V: int, phase: str) -> tuple[int, int]:
    """(whole K, V block) for the programs that hold all of K."""
    BK = max(16, next_pow2(K))
    return BK, min(max(16, next_pow2(V)), max(16, CONFIGS[phase][0] // BK))


def _blocks_k(K: int, V: int, phase: str) -> tuple[int, int]:
    """(K block, whole V) for the programs that hold all of V."""
    BV = max(16, next_pow2(V))
    return min(max(16, next_pow2(K)), max(16, CONFIGS[phase][0] // BV)), BV


def _settings(phase: str, dtype, BK: int, BV: int, H: int, K: int, V: int, split: bool) -> tuple[dict, dict]:
    """(launch options, kernel meta-parameters) of a scan kernel."""
    interpret = interpreting()
    cfg = {}
    if not interpret:
        triton.set_allocator(chunk._scratch)  # the tensor descriptors' scratch (see `chunk._config`)
        cfg = dict(chunk._launch_options(CONFIGS[phase], dtype, BK))
    meta = dict(H=H, K=K, V=V, BT=STEP_TOKENS, BK=BK, BV=BV, DT=chunk._dot_dtype(dtype),
                DOT_PREC=chunk._dot_precision(dtype), DYN_LOOP=not interpret)
    if split is not None:
        meta["SPLIT"] = split and dtype != torch.float32
    return cfg, meta


def _intra_meta(dtype, split_state: bool = False) -> dict:
    """Meta-parameters of the kernels with intra-step products (output, dv, dq, dk): FACTORED_SPAN, the operand
    type of the tensor-core form (`gla_kernels._dot_f32_both`: its factors reach exp(FACTORED_SPAN) times the
    inputs, which bfloat16's exponent range holds and float16's (65504) does not, so float16 inputs take bfloat16
    there) and, with split_state (output and dv), SPLIT_STATE for 16-bit inputs."""
    if INTRA_PRECISION not in ("split", "bf16", "tf32"):
        raise ValueError(f"gla_chunk.INTRA_PRECISION must be 'split', 'bf16' or 'tf32', got {INTRA_PRECISION!r}")
    idt = chunk._dot_dtype(torch.bfloat16 if dtype == torch.float16 else dtype)
    if INTRA_PRECISION == "tf32":
        idt = tl.float32
    meta = dict(SPAN=FACTORED_SPAN, IDT=idt, ISPLIT=INTRA_PRECISION == "split")
    if split_state:
        meta["SPLIT_STATE"] = SPLIT_STATE and dtype != torch.float32
    return meta


def _loop_bound(plan: _Plan, meta: dict) -> int:
    """The interpreter's loop bound in steps (compiled kernels walk each segment's own steps)."""
    return 0 if meta["DYN_LOOP"] else cdiv(plan.chunks_per_segment * chunk.CHUNK_SIZE, meta["BT"])


def _fwd_v_blocks(K: int, V: int) -> int:
    return cdiv(V, _blocks_v(K, V, "fwd")[1])


def _scan_segments(local, seg_decay, plan: _Plan, start, each, end, reverse: bool) -> None:
    """`chunk._scan_segments` with per-channel segment log-decays seg_decay [S, H, K]."""
    _, H, K, V = local.shape
    block, num_warps, num_stages = CONFIGS["scan"]
    BLOCK = min(block, next_pow2(K * V))
    cfg = {} if interpreting() else {"num_warps": num_warps, "num_stages": num_stages}
    gla_kernel_segment_scan[(plan.num_seqs, H, cdiv(K * V, BLOCK))](
        local, seg_decay, each if each is not None else local, start if start is not None else local,
        end if end is not None else local, plan.seq_first_seg, plan.seq_num_segs, plan.max_segs,
        H=H, K=K, V=V, BLOCK=BLOCK, HAS_START=start is not None, STORE_EACH=each is not None,
        STORE_END=end is not None, REVERSE=reverse, **cfg)


def _launch_segment_state(k, v, g, plan: _Plan, accurate: bool, phase: str = "fwd"):
    """Every segment's state from zero [S, H, K, V] and its per-channel log-decay [S, H, K]."""
    _, H, K = k.shape
    V = v.shape[-1]
    BK, BV = (max(16, next_pow2(K)), _blocks_v(K, V, phase)[1])
    NK, NV = cdiv(K, BK), cdiv(V, BV)
    cfg, meta = _settings(phase, k.dtype, BK, BV, H, K, V, accurate)
    meta["BT"] = STATE_STEP_TOKENS
    s_loc = empty(k, (plan.num_segs, H, K, V), torch.float32)
    seg_decay = empty(k, (plan.num_segs, H, K), torch.float32)
    gla_fwd_kernel_segment_state[(plan.num_segs, H, NK * NV)](
        k, v, g, s_loc, seg_decay, plan.seg_bos, plan.seg_eos, _loop_bound(plan, meta), NV=NV, **meta, **cfg)
    return s_loc, seg_decay


def _launch_segment_dstate(q, do, g, scale: float, plan: _Plan, accurate: bool, phase: str = "bwd"):
    """Every segment's dL/dS_in from its own outputs [S, H, K, V] and its per-channel log-decay [S, H, K]."""
    _, H, K = q.shape
    V = do.shape[-1]
    BK, BV = (max(16, next_pow2(K)), _blocks_v(K, V, phase)[1])
    NK, NV = cdiv(K, BK), cdiv(V, BV)
    cfg, meta = _settings(phase, q.dtype, BK, BV, H, K, V, accurate)
    meta["BT"] = STATE_STEP_TOKENS
    ds_loc = empty(q, (plan.num_segs, H, K, V), torch.float32)
    seg_decay = empty(q, (plan.num_segs, H, K), torch.float32)
    gla_bwd_kernel_segment_dstate[(plan.num_segs, H, NK * NV)](
        q, do, g, ds_loc, seg_decay, plan.seg_bos, plan.seg_eos, scale, _loop_bound(plan, meta), NV=NV,
        STORE_DECAY=True, **meta, **cfg)
    return ds_loc, seg_decay


def _launch_fwd(q, k, v, g, scale: float, h0, plan: _Plan, accurate: bool, segment_states=None):
    """q, k: [NT, H, K]; v: [NT, H, V]; g: float32 [NT, H, K]; h0: None or [N, H, K, V]. Returns o [NT, H, V],
    S_in and S_end per segment [S, H, K, V] and the segments' log-decays [S, H, K]. segment_states: step 1's result
    computed earlier by the caller (`SegmentReuse`), or None."""
    _, H, K = q.shape
    V = v.shape[-1]
    S = plan.num_segs
    if plan.max_segs > 1:
        if segment_states is not None:
            s_loc, seg_decay = segment_states
        else:
            s_loc, seg_decay = _launch_segment_state(k, v, g, plan, accurate)
        s_in = empty(s_loc, s_loc.shape, s_loc.dtype)
        _scan_segments(s_loc, seg_decay, plan, start=h0, each=s_in, end=None, reverse=False)
    else:
        seg_decay = empty(q, (S, H, K), torch.float32)
        s_in = h0.float()[plan.seg_seq].contiguous() if h0 is not None else q.new_zeros(S, H, K, V,
                                                                                        dtype=torch.float32)
    BK, BV = _blocks_v(K, V, "fwd")
    cfg, meta = _settings("fwd", q.dtype, BK, BV, H, K, V, accurate)
    o = empty(v, v.shape, v.dtype)
    s_end = empty(s_in, s_in.shape, s_in.dtype)
    gla_fwd_kernel_output[(S, H, cdiv(V, BV))](
        q, k, v, g, o, s_in, s_end, seg_decay, plan.seg_bos, plan.seg_eos, scale, _loop_bound(plan, meta),
        **_intra_meta(q.dtype, split_state=True), **meta, **cfg)
    return o, s_in, s_end, seg_decay


def _launch_bwd(q, k, v, g, do, dht, scale: float, s_in, seg_decay, final, plan: _Plan, need_dg: bool,
                need_dh0: bool, segment_dstates=None):
    """Returns dq, dk, dv (in the inputs' dtypes), dg [NT, H, K] (float32, None unless need_dg) and dh0
    [N, H, K, V] (or None). dht: the final states' gradient, None, or a function returning it, called once dq's
    kernel is queued; final: the final states (for dg when dht is given)."""
    NT, H, K = q.shape
    V = v.shape[-1]
    S = plan.num_segs
    BKK, BVF = _blocks_k(K, V, "bwd")
    NK = cdiv(K, BKK)
    cfg_k, meta_k = _settings("bwd", q.dtype, BKK, BVF, H, K, V, need_dg)
    dq = empty(q, q.shape, q.dtype)
    dg = empty(q, q.shape, torch.float32) if need_dg else dq  # q * dq first, then dg (see gla_bwd_kernel_dk)
    gla_bwd_kernel_dq[(S, H, NK)](
        q, k, v, g, do, dq, dg, s_in, plan.seg_bos, plan.seg_eos, scale, _loop_bound(plan, meta_k),
        NEED_DG=need_dg, **_intra_meta(q.dtype), **meta_k, **cfg_k)
    if callable(dht):
        dht = dht()
    dht = dht.float().contiguous() if dht is not None else None
    dh0 = None
    if plan.max_segs > 1:
        if segment_dstates is not None:
            ds_loc = segment_dstates
        else:
            ds_loc, _ = _launch_segment_dstate(q, do, g, scale, plan, need_dg)
        ds_out = empty(ds_loc, ds_loc.shape, ds_loc.dtype)
        dh0 = empty(q, (plan.num_seqs, H, K, V), torch.float32) if need_dh0 else None
        _scan_segments(ds_loc, seg_decay, plan, start=dht, each=ds_out, end=dh0, reverse=True)
    elif dht is not None:
        ds_out = dht[plan.seg_seq].contiguous()
    else:
        ds_out = q.new_zeros(S, H, K, V, dtype=torch.float32)
    dk = empty(k, k.shape, k.dtype)
    dv = empty(v, v.shape, v.dtype)
    seg_carry = empty(q, (S, H, K), torch.float32) if need_dg else dk
    seg_coef = empty(q, (S, H, K), torch.float32) if need_dg else dk
    store_start = dh0 is None and need_dh0  # one segment per sequence: dh0 is dS at the segments' starts
    ds_start = empty(ds_out, ds_out.shape, ds_out.dtype) if store_start else ds_out
    gla_bwd_kernel_dk[(S, H, NK)](
        q, k, v, g, do, dk, dg, ds_out, ds_start, seg_carry, seg_coef, plan.seg_bos, plan.seg_eos, scale,
        _loop_bound(plan, meta_k),
        NEED_DG=need_dg, STORE_START=store_start, **_intra_meta(q.dtype), **meta_k, **cfg_k)
    BK, BV = _blocks_v(K, V, "dv")
    cfg_v, meta_v = _settings("dv", q.dtype, BK, BV, H, K, V, None)
    gla_bwd_kernel_dv[(S, H, cdiv(V, BV))](
        q, k, g, do, dv, ds_out, plan.seg_bos, plan.seg_eos, scale, _loop_bound(plan, meta_v),
        **_intra_meta(q.dtype, split_state=True), **meta_v, **cfg_v)
    if store_start:
        dh0 = ds_start[plan.first_seg_index]
        keep = plan.nonempty.view(-1, 1, 1, 1)
        dh0 = torch.where(keep, dh0, dht) if dht is not None else dh0 * keep
    if need_dg and (plan.max_segs > 1 or dht is not None):
        _add_dg_carries(g, dg, seg_carry, seg_coef, dht, final, plan, meta_k, cfg_k)
    return dq, dk, dv, (dg if need_dg else None), dh0


def _add_dg_carries(g, dg, seg_carry, seg_coef, dht, final, plan: _Plan, meta: dict, cfg: dict) -> None:
    """The part of dg that crosses segments: C(s), the carry entering each segment at its end, is the final
    state's term S_final * dS_final summed over V (per sequence) walked back over the later segments with
    C(s - 1) = exp(seg_coef(s)) C(s) + seg_carry(s) (`gla_kernel_segment_scan` with V = 1); then every token
    with no restart between it and its segment's end gets C(s) (`gla_bwd_kernel_dg_carry`)."""
    _, H, K = g.shape
    S = plan.num_segs
    final_term = (dht * final).sum(-1) * plan.nonempty[:, None, None] if dht is not None else None
    if plan.max_segs > 1:
        carry_in = empty(seg_carry, (S, H, K, 1), torch.float32)
        start = final_term.unsqueeze(-1).contiguous() if final_term is not None else None
        _scan_segments(seg_carry.unsqueeze(-1), seg_coef, plan, start=start, each=carry_in, end=None, reverse=True)
    else:
        carry_in = final_term[plan.seg_seq].contiguous()
    gla_bwd_kernel_dg_carry[(S, H, cdiv(K, meta["BK"]))](
        g, dg, carry_in, plan.seg_bos, plan.seg_eos, _loop_bound(plan, meta), H=H, K=K, BT=STEP_TOKENS,
        BK=meta["BK"], DYN_LOOP=meta["DYN_LOOP"], **cfg)


# ----------------------------------------------------------------------------- forward / backward

def gla_fwd(q, k, v, g, scale: float, h0, plan: _Plan, accurate: bool = False, need_final: bool = True,
            segment_states=None):
    """Flat inputs (see `_launch_fwd`). Returns o, the final state [N, H, K, V] (None unless need_final), S_in
    per segment and the segments' log-decays."""
    o, s_in, s_end, seg_decay = _launch_fwd(q, k, v, g, scale, h0, plan, accurate, segment_states)
    if not need_final:
        return o, None, s_in, seg_decay
    final = s_end[plan.last_seg_index]
    keep = plan.nonempty.view(-1, 1, 1, 1)
    final = torch.where(keep, final, h0.float() if h0 is not None else torch.zeros_like(final))
    return o, final, s_in, seg_decay


def gla_bwd(q, k, v, g, do, dht, scale: float, s_in, seg_decay, final, plan: _Plan, need_dg: bool,
            need_dh0: bool = True, segment_dstates=None):
    return _launch_bwd(q, k, v, g, do, dht, scale, s_in, seg_decay, final, plan, need_dg, need_dh0, segment_dstates)


class SegmentReuse(chunk.SegmentReuse):
    """`chunk.SegmentReuse` for a decay per key channel: step 1 of the forward and of the backward computed by
    sequence parallelism before the op runs (the state it hands on, the gradient of the state it received),
    then handed to the op instead of computed twice. Dense input whose rows the plan cuts into segments only."""

    @classmethod
    def make(cls, q, k, v, g, accurate_states: bool):
        B, T, H, K = q.shape
        V = v.shape[-1]
        plan = _plan_for_gla(B, T, H, K, V, None, q.device)  # the op's own (cached) plan: take_* checks identity
        return cls(plan, (B, T, H, K, V), accurate_states) if plan.max_segs > 1 else None

    def _g(self, g):
        B, T, H, K = self.shape[:4]
        return g.float().reshape(B * T, H, K).contiguous()

    def _fold(self, local, seg_decay, start, reverse: bool):
        _, H, K, V = local.shape
        out = empty(local, (self.plan.num_seqs, H, K, V), torch.float32)
        start = start.float().contiguous() if start is not None else None
        _scan_segments(local, seg_decay, self.plan, start=start, each=None, end=out, reverse=reverse)
        return out

    @torch.no_grad()
    def prepare_states(self, k, v, g):
        self.segment_states = _launch_segment_state(_flat_tokens(k), _flat_tokens(v), self._g(g), self.plan,
                                                    self.accurate_states)
        return self.segment_states

    @torch.no_grad()
    def prepare_dstates(self, q, do, g, scale: float):
        ds_loc, seg_decay = _launch_segment_dstate(_flat_tokens(q), _flat_tokens(do.to(q.dtype)), self._g(g), scale,
                                                   self.plan, self.accurate_states)
        self.segment_dstates = ds_loc
        return ds_loc, seg_decay


@dataclass
class LocalPass:
    """What `local_backward` needs besides the saved tensors (returned by `local_forward`)."""

    plan: _Plan
    scale: float
    shape: tuple          # (B, T, H, K, V)
    need_dg: bool
    g_dtype: torch.dtype
    h0_dtype: torch.dtype | None
    reuse: SegmentReuse | None = None


def local_forward(q, k, v, g, *, scale: float, initial_state=None, cu_seqlens=None, need_final=False,
                  need_dg=False, reuse=None):
    """The forward pass without autograd, for a caller that runs the backward itself (sequence parallelism).
    As `chunk.local_forward` with g [B, T, H, K]; reuse: this module's `SegmentReuse` (dense input) or None."""
    if reuse is not None and cu_seqlens is not None:
        raise ValueError("reuse (SegmentReuse) is for dense input; got cu_seqlens")
    B, T, H, K = q.shape
    V = v.shape[-1]
    plan = _plan_for_gla(B, T, H, K, V, cu_seqlens, q.device)
    qf, kf, vf = (_flat_tokens(x) for x in (q, k, v))
    g32 = g.float().reshape(B * T, H, K).contiguous()
    h0 = initial_state.contiguous() if initial_state is not None else None
    o, final, s_in, seg_decay = gla_fwd(qf, kf, vf, g32, scale, h0, plan, need_dg, need_final=need_final,
                                        segment_states=reuse.take_states(plan, need_dg) if reuse is not None else None)
    info = LocalPass(plan, scale, (B, T, H, K, V), need_dg, g.dtype, h0.dtype if h0 is not None else None, reuse)
    return o.view(B, T, H, V), final, (qf, kf, vf, g32, s_in, seg_decay, final), info


def local_backward(saved, info: LocalPass, do, dfinal=None, *, need_dh0: bool = False):
    """The backward of `local_forward`: (dq, dk, dv, dg, dh0) shaped as the inputs (dg None unless need_dg; dh0
    None unless need_dh0). dfinal: the final state's gradient, None, or a function returning either."""
    q, k, v, g32, s_in, seg_decay, final = saved
    B, T, H, K, V = info.shape
    dstates = info.reuse.take_dstates(info.plan, info.need_dg) if info.reuse is not None else None
    dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g32, _flat_tokens(do.to(q.dtype)), dfinal, info.scale, s_in, seg_decay,
                                  final, info.plan, info.need_dg, need_dh0, dstates)
    if dg is not None:
        dg = dg.view(B, T, H, K).to(info.g_dtype)
    dh0 = dh0.to(info.h0_dtype) if need_dh0 and dh0 is not None else None
    return dq.view(B, T, H, K), dk.view(B, T, H, K), dv.view(B, T, H, V), dg, dh0


def _plan_for_gla(B: int, T: int, H: int, K: int, V: int, cu_seqlens, device) -> _Plan:
    """The shared segment plan (`chunk._plan_for`), counting this forward's V blocks."""
    if cu_seqlens is None:
        return chunk._dense_plan(B, T, H, _fwd_v_blocks(K, V), device, chunk._planning_knobs())
    return chunk._packed_plan(host_bounds(cu_seqlens), H, _fwd_v_blocks(K, V), device,
                              chunk._planning_knobs())


class ChunkGLAFunction(torch.autograd.Function):
    """`local_forward` / `local_backward` as one autograd node."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, cu_seqlens, output_final_state):
        o, final, saved, info = local_forward(
            q, k, v, g, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens,
            need_final=output_final_state, need_dg=ctx.needs_input_grad[3])
        ctx.save_for_backward(*saved)
        ctx.info = info
        return o, (final if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        dq, dk, dv, dg, dh0 = local_backward(ctx.saved_tensors, ctx.info, do, dht, need_dh0=ctx.needs_input_grad[4])
        return dq, dk, dv, dg, dh0, None, None, None


# ----------------------------------------------------------------------------- state-only passes (SP)

def _state_pass(x, y, g, start, scale: float, gradient: bool):
    B, T, H, K = x.shape
    V = y.shape[-1]
    if T == 0:
        return start.float().clone() if start is not None else x.new_zeros(B, H, K, V, dtype=torch.float32)
    plan = chunk._dense_plan(B, T, H, _fwd_v_blocks(K, V), x.device, chunk._planning_knobs())
    xf, yf = _flat_tokens(x), _flat_tokens(y.to(x.dtype))
    g32 = g.float().reshape(B * T, H, K).contiguous()
    if gradient:
        local, seg_decay = _launch_segment_dstate(xf, yf, g32, scale, plan, False, "state")
    else:
        local, seg_decay = _launch_segment_state(xf, yf, g32, plan, False, "state")
    if plan.max_segs == 1 and start is None:
        return local  # one segment per row, in row order
    out = empty(local, (plan.num_seqs, H, K, V), torch.float32)
    start = start.float().contiguous() if start is not None else None
    _scan_segments(local, seg_decay, plan, start=start, each=None, end=out, reverse=gradient)
    return out


@torch.no_grad()
def final_state_only(k, v, g, *, initial_state=None):
    """The state after all T tokens without the output, float32 [B, H, K, V]: g [B, T, H, K], initial_state None
    or [B, H, K, V]. See `state_only.final_state_only`."""
    return _state_pass(k, v, g, initial_state, 1.0, gradient=False)


@torch.no_grad()
def initial_state_grad_only(q, do, g, *, scale: float):
    """scale * sum_t (q_t * exp(G_t))^T do_t (G_t the per-channel cumulative log-decay, inclusive), float32
    [B, H, K, V]: the gradient of sum(o * do) with respect to the initial state."""
    return _state_pass(q, do, g, None, scale, gradient=True)


# ----------------------------------------------------------------------------- public function

def chunk_linear_attention(q, k, v, g, *, scale: float, initial_state=None, output_final_state=False,
                           cu_seqlens=None):
    """Triton backend of `lasp_hf.linear_attention` for a decay per key channel (inputs already validated).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (float32, bfloat16 or float16; K, V multiples of 16 up to 256).
        g: [B, T, H, K] natural-log decay (<= 0, -inf restarts the channel).
        scale: multiplies q.
        initial_state: None or [B, H, K, V] ([N, H, K, V] with cu_seqlens).
        output_final_state: also return the float32 state after the last token.
        cu_seqlens: None or int [N + 1] with B == 1: packed sequences.
    Returns:
        o [B, T, H, V] in v's dtype, and the final state float32 [B or N, H, K, V] or None.
    """
    return ChunkGLAFunction.apply(q, k, v, g, initial_state, scale, cu_seqlens, output_final_state)
