"""Triton kernels of linear attention with a decay per key channel (GLA); the launchers, autograd and the math
are in `lasp_hf.kernels.triton.gla_chunk`, whose docstring this file follows.

Shapes: H heads, K key/query head dim, V value head dim, BT tokens per step (16; 32 in the segment-state
passes), BK / BV the K / V block a program holds, S segments. Token tensors are flat [tokens, H, D]; g is
float32 [tokens, H, K]; states are float32 [S or N, H, K, V]; segment log-decays float32 [S, H, K].
Each scan kernel is one program per (segment, head, block) walking the segment's BT-token steps in order (or
in reverse), with its state block in registers. A step's decays are, per channel: b, the cumulative sum of
the finite g from the step's start, and r, the cumulative count of g = -inf (restarts). A factor
exp(b_i - b_j) is kept only where r_i == r_j (no restart between), and every exponent used is <= 0.
"""

import triton
import triton.language as tl
from lasp_hf.kernels.triton.chunk_kernels import _dot_f32_left, _dot_f32_right, _num_chunks, _token_tiles
from lasp_hf.kernels.triton.launch import fast


@triton.jit
def _gla_step_decay(g, i_h, t0, length, o_k, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr):
    """(b, r, b_last, r_last) of the step starting at token t0 (`length` tokens left in the segment) for the
    channels o_k: b, r [BT, BK] as in the module docstring, b_last, r_last [BK] their values after the step.
    Tokens past the segment's end (and channels past K) read g = 0: they change nothing."""
    o_t = tl.arange(0, BT)
    mask = (o_t[:, None] < length) & (o_k[None, :] < K)
    g_tile = tl.load(g + (t0 + o_t[:, None]) * (H * K) + i_h * K + o_k[None, :], mask=mask, other=0.0)
    reset = g_tile == float("-inf")
    finite = tl.where(reset, 0.0, g_tile)
    restarts = tl.where(reset, 1.0, 0.0)
    return tl.cumsum(finite, 0), tl.cumsum(restarts, 0), tl.sum(finite, 0), tl.sum(restarts, 0)


@triton.jit
def _step_resets(g, i_h, t0, length, o_k, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr):
    """[BT, BK] whether g = -inf (a restart) at each token and channel of the step."""
    o_t = tl.arange(0, BT)
    mask = (o_t[:, None] < length) & (o_k[None, :] < K)
    g_tile = tl.load(g + (t0 + o_t[:, None]) * (H * K) + i_h * K + o_k[None, :], mask=mask, other=0.0)
    return g_tile == float("-inf")


@triton.jit
def _masked_exp(diff, keep):
    """exp(diff) where keep, else 0; diff is clamped at 0 so the dropped entries cannot overflow."""
    return tl.where(keep, tl.exp(tl.minimum(diff, 0.0)), 0.0)


@triton.jit
def _row(x, sel):
    """Row `sel` ([BT] one-hot mask) of the register tile x [BT, D] as a [D] vector."""
    return tl.sum(tl.where(sel[:, None], x, 0.0), 0)


@triton.jit
def _token_row(x, t, end, i_h, o_k, H: tl.constexpr, K: tl.constexpr):
    """x[t, i_h, o_k] of a flat [tokens, H, K] tensor as float32 [BK] (zeros past the segment: t >= end)."""
    # A vector mask: the interpreter cannot broadcast a scalar mask against a block.
    mask = (o_k < K) & ((o_k * 0 + t) < end)
    return tl.load(x + t * (H * K) + i_h * K + o_k, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _next_row_decay(g, t, end, i_h, o_k, b_j, r_j, H: tl.constexpr, K: tl.constexpr):
    """(b, r) of token t from those of token t - 1: the cumulative finite log-decay and restart count."""
    g_j = _token_row(g, t, end, i_h, o_k, H, K)
    reset = g_j == float("-inf")
    return b_j + tl.where(reset, 0.0, g_j), r_j + tl.where(reset, 1.0, 0.0)


@triton.jit
def _intra_scores(b_q, k, g, t0, end, i_h, o_k, b, r, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr):
    """A [BT, BT] with A_ij = sum_c q_ic k_jc exp(b_ic - b_jc) for j <= i (no restart of c in (j, i]), float32,
    for the step at token t0. Formed one column at a time, elementwise, so each decay factor is exp of a
    non-positive number; row j of k and g is read from memory (a cache hit: the step's tiles were just read)."""
    o_t = tl.arange(0, BT)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    b_j = o_k.to(tl.float32) * 0.0
    r_j = b_j
    for j in range(BT):
        b_j, r_j = _next_row_decay(g, t0 + j, end, i_h, o_k, b_j, r_j, H, K)
        k_j = _token_row(k, t0 + j, end, i_h, o_k, H, K)
        decay = _masked_exp(b - b_j[None, :], (o_t[:, None] >= j) & (r == r_j[None, :]))
        column = tl.sum(b_q * k_j[None, :] * decay, 1)
        scores = tl.where(o_t[None, :] == j, column[:, None], scores)
    return scores


@triton.jit
def _factorizable(b_last, r_last, SPAN: tl.constexpr):
    """Whether a step's intra-step factors exp(b_ic - b_jc) may be split as exp(b_ic) * exp(-b_jc) (the step's
    start as the reference point): no restart in the tile and every channel's decay over the step at most
    SPAN, so exp(-b) <= exp(SPAN) and exp(b) >= exp(-SPAN), both far inside float32's range."""
    return (tl.max(r_last, 0) == 0) & (tl.min(b_last, 0) >= -SPAN)


@triton.jit
def _dot_f32_both(a, b, DT: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b for float32 a and b: with 16-bit operand types and SPLIT each is split into hi + lo and three
    products are summed (about 16 mantissa bits, as the elementwise form's float32 within a bf16 rounding);
    without SPLIT one product of the roundings. DT must hold exp(+-FACTORED_SPAN) times the inputs: bfloat16 or
    float32, never float16 (`gla_chunk._intra_meta`)."""
    a_hi = a.to(DT)
    b_hi = b.to(DT)
    out = tl.dot(a_hi, b_hi, input_precision=DOT_PREC)
    if SPLIT and DT != tl.float32:
        out += tl.dot((a - a_hi.to(tl.float32)).to(DT), b_hi, input_precision=DOT_PREC)
        out += tl.dot(a_hi, (b - b_hi.to(tl.float32)).to(DT), input_precision=DOT_PREC)
    return out


@triton.jit
def _step_scores(b_q, b_k, k, g, t0, end, i_h, o_k, b, r, b_last, r_last, H: tl.constexpr, K: tl.constexpr,
                 BT: tl.constexpr, IDT: tl.constexpr, DOT_PREC: tl.constexpr, SPAN: tl.constexpr,
                 ISPLIT: tl.constexpr):
    """The step's A [BT, BT] (`_intra_scores`): on the tensor cores as (q exp(b)) (k exp(-b))^T, causally
    masked, when the step is `_factorizable`, else elementwise."""
    if _factorizable(b_last, r_last, SPAN):
        o_t = tl.arange(0, BT)
        scores = _dot_f32_both(b_q * tl.exp(b), tl.trans(b_k * tl.exp(-b)), IDT, DOT_PREC, ISPLIT)
        scores = tl.where(o_t[:, None] >= o_t[None, :], scores, 0.0)
    else:
        scores = _intra_scores(b_q, k, g, t0, end, i_h, o_k, b, r, H, K, BT)
    return scores


@fast
@triton.jit
def gla_fwd_kernel_segment_state(k, v, g, s_loc, seg_decay, seg_bos, seg_eos, CPS,
                                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                                 BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr,
                                 SPLIT: tl.constexpr, NV: tl.constexpr, DYN_LOOP: tl.constexpr = False):
    """One program per (segment, head, K block x V block; NV V blocks): the segment's state from zero and its
    per-channel log-decay (-inf where a channel restarts)."""
    i_s, i_h, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // NV, i_kv % NV
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    state = tl.zeros([BK, BV], dtype=tl.float32)
    log_decay = tl.zeros([BK], dtype=tl.float32)
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_v = _token_tiles(v, bos, eos, i_h, H, V, BT, BV)
    for i in range(_num_chunks(bos, eos, CPS, BT, DYN_LOOP)):
        r0 = i * BT
        t0 = bos + r0
        b_k = tiles_k.load([r0, i_k * BK]).to(tl.float32)
        b_v = tiles_v.load([r0, i_v * BV]).to(DT)
        b, r, b_last, r_last = _gla_step_decay(g, i_h, t0, eos - t0, o_k, H, K, BT)
        k_to_end = b_k * _masked_exp(b_last[None, :] - b, r == r_last[None, :])
        state = state * _masked_exp(b_last, r_last == 0)[:, None] + _dot_f32_left(
            tl.trans(k_to_end), b_v, DT, DOT_PREC, SPLIT)
        log_decay += tl.where(r_last == 0, b_last, float("-inf"))
    p_s = s_loc + ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_s, state, mask=m_k[:, None] & (o_v[None, :] < V))
    if i_v == 0:
        tl.store(seg_decay + (i_s * H + i_h) * K + o_k, log_decay, mask=m_k)


@fast
@triton.jit(do_not_specialize=["MAX_SEGS"])
def gla_kernel_segment_scan(local, seg_decay, each, start, end, seq_first_seg, seq_num_segs, MAX_SEGS,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
                            HAS_START: tl.constexpr, STORE_EACH: tl.constexpr, STORE_END: tl.constexpr,
                            REVERSE: tl.constexpr):
    """One program per (sequence, head, BLOCK elements of the flattened K x V state): the walk over the
    sequence's segments s (in order, or REVERSE) of  state = diag(exp(a_s)) state + local(s)  from `start`
    [N, H, K, V] (or zeros), as `chunk_kernels._kernel_segment_scan` with a per-channel a_s [S, H, K]."""
    i_n, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(seq_first_seg + i_n)
    num_segs = tl.load(seq_num_segs + i_n)
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    m = o < K * V
    p_seq = (i_n * H + i_h).to(tl.int64) * (K * V) + o
    if HAS_START:
        state = tl.load(start + p_seq, mask=m, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, MAX_SEGS):
        if REVERSE:
            seg = first + num_segs - 1 - i
        else:
            seg = first + i
        mask = m & ((o * 0 + i) < num_segs)
        base = (seg * H + i_h).to(tl.int64) * (K * V)
        tile = tl.load(local + base + o, mask=mask, other=0.0)
        decay = tl.exp(tl.load(seg_decay + (seg * H + i_h) * K + o // V, mask=mask, other=0.0))
        if STORE_EACH:
            tl.store(each + base + o, state, mask=mask)
        state = tl.where(mask, state * decay + tile, state)
    if STORE_END:
        tl.store(end + p_seq, state, mask=m)


@fast
@triton.jit
def gla_fwd_kernel_output(q, k, v, g, o, s_in, s_end, seg_decay, seg_bos, seg_eos, scale, CPS,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
                          SPAN: tl.constexpr, IDT: tl.constexpr, SPLIT_STATE: tl.constexpr,
                          DYN_LOOP: tl.constexpr = False, ISPLIT: tl.constexpr = True):
    """One program per (segment, head, V block), with all of K: scan the segment's steps from S_in, writing o,
    the state at the segment's end and (V block 0) its per-channel log-decay."""
    i_s, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    p_state = ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    state = tl.load(s_in + p_state, mask=m_kv, other=0.0)
    log_decay = tl.zeros([BK], dtype=tl.float32)
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_v = _token_tiles(v, bos, eos, i_h, H, V, BT, BV)
    tiles_o = _token_tiles(o, bos, eos, i_h, H, V, BT, BV)
    for i in range(_num_chunks(bos, eos, CPS, BT, DYN_LOOP)):
        r0 = i * BT
        t0 = bos + r0
        b_q = tiles_q.load([r0, 0]).to(tl.float32)
        b_k = tiles_k.load([r0, 0]).to(tl.float32)
        b_v = tiles_v.load([r0, i_v * BV]).to(DT)
        b, r, b_last, r_last = _gla_step_decay(g, i_h, t0, eos - t0, o_k, H, K, BT)
        scores = _step_scores(b_q, b_k, k, g, t0, eos, i_h, o_k, b, r, b_last, r_last, H, K, BT, IDT, DOT_PREC, SPAN,
                              ISPLIT)
        b_o = tl.dot(scores.to(DT), b_v, input_precision=DOT_PREC)
        q_from_start = (b_q * _masked_exp(b, r == 0)).to(DT)
        b_o += _dot_f32_right(q_from_start, state, DT, DOT_PREC, SPLIT_STATE)
        tiles_o.store([r0, i_v * BV], (b_o * scale).to(o.dtype.element_ty))
        k_to_end = b_k * _masked_exp(b_last[None, :] - b, r == r_last[None, :])
        state = state * _masked_exp(b_last, r_last == 0)[:, None] + _dot_f32_left(
            tl.trans(k_to_end), b_v, DT, DOT_PREC, SPLIT)
        log_decay += tl.where(r_last == 0, b_last, float("-inf"))
    tl.store(s_end + p_state, state, mask=m_kv)
    if i_v == 0:
        tl.store(seg_decay + (i_s * H + i_h) * K + o_k, log_decay, mask=o_k < K)


@fast
@triton.jit
def gla_bwd_kernel_segment_dstate(q, do, g, ds_loc, seg_decay, seg_bos, seg_eos, scale, CPS,
                                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                                  BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr,
                                  SPLIT: tl.constexpr, NV: tl.constexpr, STORE_DECAY: tl.constexpr = False,
                                  DYN_LOOP: tl.constexpr = False):
    """One program per (segment, head, K block x V block; NV V blocks): dL/dS_in of the segment from its own
    outputs, scale * sum_t (q_t * exp(B_t))^T do_t, and (STORE_DECAY) its per-channel log-decay."""
    i_s, i_h, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // NV, i_kv % NV
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    log_decay = tl.zeros([BK], dtype=tl.float32)
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    tiles_do = _token_tiles(do, bos, eos, i_h, H, V, BT, BV)
    n_steps = _num_chunks(bos, eos, CPS, BT, DYN_LOOP)
    for i in range(n_steps):
        r0 = (n_steps - 1 - i) * BT
        t0 = bos + r0
        b_q = tiles_q.load([r0, i_k * BK]).to(tl.float32)
        b_do = tiles_do.load([r0, i_v * BV]).to(DT)
        b, r, b_last, r_last = _gla_step_decay(g, i_h, t0, eos - t0, o_k, H, K, BT)
        q_from_start = b_q * _masked_exp(b, r == 0)
        dstate = dstate * _masked_exp(b_last, r_last == 0)[:, None] + _dot_f32_left(
            tl.trans(q_from_start), b_do, DT, DOT_PREC, SPLIT)
        log_decay += tl.where(r_last == 0, b_last, float("-inf"))
    p_s = ds_loc + ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_s, dstate * scale, mask=m_k[:, None] & (o_v[None, :] < V))
    if STORE_DECAY and i_v == 0:
        tl.store(seg_decay + (i_s * H + i_h) * K + o_k, log_decay, mask=m_k)


@fast
@triton.jit
def gla_bwd_kernel_dv(q, k, g, do, dv, ds_out, seg_bos, seg_eos, scale, CPS,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr, SPAN: tl.constexpr,
                      IDT: tl.constexpr, SPLIT_STATE: tl.constexpr, DYN_LOOP: tl.constexpr = False,
                      ISPLIT: tl.constexpr = True):
    """One program per (segment, head, V block), with all of K: reverse scan from dS at the segment's end,
    writing dv = A^T do + (k * exp(b_last - b)) dS_end for the block."""
    i_s, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    p_state = ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    dstate = tl.load(ds_out + p_state, mask=m_kv, other=0.0)
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_do = _token_tiles(do, bos, eos, i_h, H, V, BT, BV)
    tiles_dv = _token_tiles(dv, bos, eos, i_h, H, V, BT, BV)
    n_steps = _num_chunks(bos, eos, CPS, BT, DYN_LOOP)
    for i in range(n_steps):
        r0 = (n_steps - 1 - i) * BT
        t0 = bos + r0
        b_q = tiles_q.load([r0, 0]).to(tl.float32)
        b_k = tiles_k.load([r0, 0]).to(tl.float32)
        b_do = tiles_do.load([r0, i_v * BV]).to(DT)
        b, r, b_last, r_last = _gla_step_decay(g, i_h, t0, eos - t0, o_k, H, K, BT)
        scores = _step_scores(b_q, b_k, k, g, t0, eos, i_h, o_k, b, r, b_last, r_last, H, K, BT, IDT, DOT_PREC,
                              SPAN, ISPLIT) * scale
        b_dv = tl.dot(tl.trans(scores.to(DT)), b_do, input_precision=DOT_PREC)
        k_to_end = (b_k * _masked_exp(b_last[None, :] - b, r == r_last[None, :])).to(DT)
        b_dv += _dot_f32_right(k_to_end, dstate, DT, DOT_PREC, SPLIT_STATE)
        tiles_dv.store([r0, i_v * BV], b_dv.to(dv.dtype.element_ty))
        q_from_start = (b_q * _masked_exp(b, r == 0) * scale).to(DT)
        dstate = dstate * _masked_exp(b_last, r_last == 0)[:, None] + tl.dot(
            tl.trans(q_from_start), b_do, input_precision=DOT_PREC)


@fast
@triton.jit
def gla_bwd_kernel_dk(q, k, v, g, do, dk, dg, ds_out, ds_start, seg_carry, seg_coef, seg_bos, seg_eos, scale, CPS,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
                      NEED_DG: tl.constexpr, STORE_START: tl.constexpr, SPAN: tl.constexpr, IDT: tl.constexpr,
                      DYN_LOOP: tl.constexpr = False, ISPLIT: tl.constexpr = True):
    """One program per (segment, head, K block), with all of V: reverse scan from dS at the segment's end (rows
    of this K block), writing dk for the block and dS at the segment's start (STORE_START).

    NEED_DG: `dg` holds q * dq (float32, from the dq kernel) and is overwritten with the segment's part of dg:
    X_t = d_t + [g_{t+1} != -inf] X_{t+1} from X = 0 at the segment's end, d = q * dq - k * dk, and dg_t = X_t
    where g_t != -inf (0 at a restart). Per segment and channel it also writes what the later segments' carry
    needs: seg_carry = X at the segment's first token (0 if that token restarts) and seg_coef = 0 if the carry
    entering at the segment's end reaches its first token and the token before it, else -inf (log of 1 / 0)."""
    i_s, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    causal = o_t[:, None] >= o_t[None, :]
    p_state = ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    dstate = tl.load(ds_out + p_state, mask=m_kv, other=0.0)
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_dk = _token_tiles(dk, bos, eos, i_h, H, K, BT, BK)
    tiles_v = _token_tiles(v, bos, eos, i_h, H, V, BT, BV)
    tiles_do = _token_tiles(do, bos, eos, i_h, H, V, BT, BV)
    tiles_dg = _token_tiles(dg, bos, eos, i_h, H, K, BT, BK)
    carry = tl.zeros([BK], dtype=tl.float32)        # X at the token after the current row
    restart_next = tl.zeros([BK], dtype=tl.float32)  # whether that token restarts (1.0) or not
    restarts = tl.zeros([BK], dtype=tl.float32)      # restarts in the rows walked so far
    n_steps = _num_chunks(bos, eos, CPS, BT, DYN_LOOP)
    for i in range(n_steps):
        r0 = (n_steps - 1 - i) * BT
        t0 = bos + r0
        b_q = tiles_q.load([r0, i_k * BK]).to(tl.float32)
        b_k = tiles_k.load([r0, i_k * BK]).to(tl.float32)
        b_v = tiles_v.load([r0, 0]).to(DT)
        b_do = tiles_do.load([r0, 0]).to(DT)
        b, r, b_last, r_last = _gla_step_decay(g, i_h, t0, eos - t0, o_k, H, K, BT)
        dscores = tl.where(causal, tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC), 0.0)
        # dk_jc = scale * sum_i dA_ij q_ic exp(b_ic - b_jc): exp(-b_jc) (dA^T (q exp(b)))_jc on the tensor cores
        # when the step is factorizable, else one row j at a time (elementwise decays).
        if _factorizable(b_last, r_last, SPAN):
            b_dk = _dot_f32_both(tl.trans(dscores), b_q * tl.exp(b), IDT, DOT_PREC, ISPLIT) * tl.exp(-b)
        else:
            b_dk = tl.zeros([BT, BK], dtype=tl.float32)
            b_j = o_k.to(tl.float32) * 0.0
            r_j = b_j
            for j in range(BT):
                sel = o_t == j
                b_j, r_j = _next_row_decay(g, t0 + j, eos, i_h, o_k, b_j, r_j, H, K)
                decay = _masked_exp(b - b_j[None, :], (o_t[:, None] >= j) & (r == r_j[None, :]))
                d_col = tl.sum(tl.where(o_t[None, :] == j, dscores, 0.0), 1)
                row = tl.sum(d_col[:, None] * b_q * decay, 0)
                b_dk = tl.where(sel[:, None], row[None, :], b_dk)
        k_decay = _masked_exp(b_last[None, :] - b, r == r_last[None, :])
        b_dk = b_dk * scale + _dot_f32_right(b_v, tl.trans(dstate), DT, DOT_PREC, SPLIT) * k_decay
        tiles_dk.store([r0, i_k * BK], b_dk.to(dk.dtype.element_ty))
        if NEED_DG:
            d_log = tiles_dg.load([r0, i_k * BK]) - b_k * b_dk
            if tl.max(r_last, 0) == 0:  # no restart in the step: X is a reverse cumulative sum plus the carry
                carry = tl.where(restart_next > 0, 0.0, carry)
                b_dg = tl.cumsum(d_log, 0, reverse=True) + carry[None, :]
                carry = _row(b_dg, o_t == 0)
                restart_next = tl.zeros([BK], dtype=tl.float32)
            else:
                reset = tl.where(_step_resets(g, i_h, t0, eos - t0, o_k, H, K, BT), 1.0, 0.0)
                b_dg = tl.zeros([BT, BK], dtype=tl.float32)
                for jj in range(BT):
                    sel = o_t == BT - 1 - jj
                    reset_j = _row(reset, sel)
                    carry = _row(d_log, sel) + tl.where(restart_next > 0, 0.0, carry)
                    b_dg = tl.where(sel[:, None], tl.where(reset_j > 0, 0.0, carry)[None, :], b_dg)
                    restart_next = reset_j
            tiles_dg.store([r0, i_k * BK], b_dg)
            restarts += r_last
        q_from_start = b_q * _masked_exp(b, r == 0) * scale
        dstate = dstate * _masked_exp(b_last, r_last == 0)[:, None] + _dot_f32_left(
            tl.trans(q_from_start), b_do, DT, DOT_PREC, SPLIT)
    if STORE_START:
        tl.store(ds_start + p_state, dstate, mask=m_kv)
    if NEED_DG:
        p_seg = (i_s * H + i_h) * K + o_k
        tl.store(seg_carry + p_seg, tl.where(restart_next > 0, 0.0, carry), mask=o_k < K)
        tl.store(seg_coef + p_seg, tl.where(restarts > 0, float("-inf"), 0.0), mask=o_k < K)


@fast
@triton.jit
def gla_bwd_kernel_dg_carry(g, dg, seg_carry_in, seg_bos, seg_eos, CPS, H: tl.constexpr, K: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, DYN_LOOP: tl.constexpr = False):
    """One program per (segment, head, K block): dg_t += C(s) for the segment's tokens t with no restart in
    [t, end of the segment], C(s) = seg_carry_in [S, H, K] the carry entering at the segment's end (the later
    segments' sum, and the final state's term)."""
    i_s, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    carry = tl.load(seg_carry_in + (i_s * H + i_h) * K + o_k, mask=o_k < K, other=0.0)
    tiles_dg = _token_tiles(dg, bos, eos, i_h, H, K, BT, BK)
    later = tl.zeros([BK], dtype=tl.float32)  # restarts after the current step
    n_steps = _num_chunks(bos, eos, CPS, BT, DYN_LOOP)
    for i in range(n_steps):
        r0 = (n_steps - 1 - i) * BT
        t0 = bos + r0
        _, r, _, r_last = _gla_step_decay(g, i_h, t0, eos - t0, o_k, H, K, BT)
        reset = _step_resets(g, i_h, t0, eos - t0, o_k, H, K, BT)
        # restarts in [t, step end] = r_last - r_t + [t restarts]
        keep = (r_last[None, :] - r == 0) & (~reset) & (later[None, :] == 0)
        b_dg = tiles_dg.load([r0, i_k * BK])
        tiles_dg.store([r0, i_k * BK], b_dg + tl.where(keep, carry[None, :], 0.0))
        later += r_last


@fast
@triton.jit
def gla_bwd_kernel_dq(q, k, v, g, do, dq, qdq, s_in, seg_bos, seg_eos, scale, CPS,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
                      NEED_DG: tl.constexpr, SPAN: tl.constexpr, IDT: tl.constexpr, DYN_LOOP: tl.constexpr = False,
                      ISPLIT: tl.constexpr = True):
    """One program per (segment, head, K block), with all of V: forward scan from S_in (rows of this K block),
    writing dq for the block and q * dq in float32 (NEED_DG)."""
    i_s, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    causal = o_t[:, None] >= o_t[None, :]
    p_state = ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    state = tl.load(s_in + p_state, mask=m_kv, other=0.0)
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_dq = _token_tiles(dq, bos, eos, i_h, H, K, BT, BK)
    tiles_v = _token_tiles(v, bos, eos, i_h, H, V, BT, BV)
    tiles_do = _token_tiles(do, bos, eos, i_h, H, V, BT, BV)
    tiles_qdq = _token_tiles(qdq, bos, eos, i_h, H, K, BT, BK)
    for i in range(_num_chunks(bos, eos, CPS, BT, DYN_LOOP)):
        r0 = i * BT
        t0 = bos + r0
        b_q = tiles_q.load([r0, i_k * BK]).to(tl.float32)
        b_k = tiles_k.load([r0, i_k * BK]).to(tl.float32)
        b_v = tiles_v.load([r0, 0]).to(DT)
        b_do = tiles_do.load([r0, 0]).to(DT)
        b, r, b_last, r_last = _gla_step_decay(g, i_h, t0, eos - t0, o_k, H, K, BT)
        dscores = tl.where(causal, tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC), 0.0)
        # dq_ic = scale * sum_j dA_ij k_jc exp(b_ic - b_jc): exp(b_ic) (dA (k exp(-b)))_ic on the tensor cores when
        # the step is factorizable, else one column j at a time.
        if _factorizable(b_last, r_last, SPAN):
            b_dq = _dot_f32_both(dscores, b_k * tl.exp(-b), IDT, DOT_PREC, ISPLIT) * tl.exp(b)
        else:
            b_dq = tl.zeros([BT, BK], dtype=tl.float32)
            b_j = o_k.to(tl.float32) * 0.0
            r_j = b_j
            for j in range(BT):
                b_j, r_j = _next_row_decay(g, t0 + j, eos, i_h, o_k, b_j, r_j, H, K)
                k_j = _token_row(k, t0 + j, eos, i_h, o_k, H, K)
                decay = _masked_exp(b - b_j[None, :], (o_t[:, None] >= j) & (r == r_j[None, :]))
                d_col = tl.sum(tl.where(o_t[None, :] == j, dscores, 0.0), 1)
                b_dq += d_col[:, None] * k_j[None, :] * decay
        q_decay = _masked_exp(b, r == 0)
        b_dq = (b_dq + _dot_f32_right(b_do, tl.trans(state), DT, DOT_PREC, SPLIT) * q_decay) * scale
        tiles_dq.store([r0, i_k * BK], b_dq.to(dq.dtype.element_ty))
        if NEED_DG:
            tiles_qdq.store([r0, i_k * BK], b_q * b_dq)
        k_to_end = b_k * _masked_exp(b_last[None, :] - b, r == r_last[None, :])
        state = state * _masked_exp(b_last, r_last == 0)[:, None] + _dot_f32_left(
            tl.trans(k_to_end), b_v, DT, DOT_PREC, SPLIT)
