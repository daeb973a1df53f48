"""Triton kernels of the chunked linear attention op (the launchers, autograd and the math are in
`lasp_hf.kernels.triton.chunk`, whose docstring this file follows).

Shapes: H heads, K key/query head dim, V value head dim, BT chunk length, BK / BV the K / V block a
program holds, S segments. Token tensors are flat [tokens, H, D]; states are float32 [S or N, H, K, V].
Each scan kernel is one program per (segment, head, block) walking the segment's chunks in order (or in
reverse), with the state block in registers; chunk tiles come through tensor descriptors, which read
zeros past a segment's end and drop writes there, so no chunk needs masks.
The launched kernels are wrapped in `launch.fast`: the same `kernel[grid](...)` call, with less host time.
"""

import triton
import triton.language as tl
from lasp_hf.kernels.triton.launch import fast


@triton.jit
def _chunk_decay(g, i_h, t0, length, H: tl.constexpr, G_MODE: tl.constexpr, BT: tl.constexpr):
    """For the chunk starting at t0: b (cumulative log-decay inside the chunk, [BT]), b_last, r (restarts,
    g = -inf, up to each token, [BT]) and r_last. A restart counts as 0 in b, and the factors below that span
    it are 0 instead: exp(b_i - b_j) of two tokens after a restart would otherwise be exp(-inf + inf) = NaN."""
    o_t = tl.arange(0, BT)
    m_t = o_t < length
    if G_MODE == 1:
        g_vec = tl.where(m_t, tl.load(g + i_h).to(tl.float32), 0.0)
    elif G_MODE == 2:
        g_vec = tl.load(g + t0 * H + i_h + o_t * H, mask=m_t, other=0.0).to(tl.float32)
    else:
        g_vec = tl.zeros([BT], dtype=tl.float32)
    restart = g_vec == float("-inf")
    g_vec = tl.where(restart, 0.0, g_vec)
    r = tl.cumsum(restart.to(tl.int32), 0)
    return tl.cumsum(g_vec, 0), tl.sum(g_vec, 0), r, tl.sum(restart.to(tl.int32), 0)


@triton.jit
def _pair_decay(b, r):
    """exp(b_i - b_j) for token i and an earlier token j of a chunk; 0 where a restart lies in (j, i]."""
    return tl.where(r[:, None] == r[None, :], tl.exp(b[:, None] - b[None, :]), 0.0)


@triton.jit
def _same_run(r):
    """[BT, BT]: no restart lies between the two tokens (folded into the causal mask by the forward, whose
    shared memory has no room for a second masked [BT, BT] product)."""
    return r[:, None] == r[None, :]


@triton.jit
def _decay_in(b, r):
    """exp(b_i): the share of the state entering the chunk that token i sees (0 from a restart on)."""
    return tl.where(r == 0, tl.exp(b), 0.0)


@triton.jit
def _decay_out(b, b_last, r, r_last):
    """exp(b_last - b_j): the share of token j's k^T v that reaches the chunk's end (0 before a restart)."""
    return tl.where(r == r_last, tl.exp(b_last - b), 0.0)


@triton.jit
def _decay_through(b_last, r_last):
    """exp(b_last): the factor on a state crossing the whole chunk (0 if it restarts)."""
    return tl.where(r_last == 0, tl.exp(b_last), 0.0)


@triton.jit
def _log_decay_through(b_last, r_last):
    """log of `_decay_through` (-inf if the chunk restarts)."""
    return tl.where(r_last == 0, b_last, float("-inf"))


@triton.jit
def _num_chunks(bos, eos, CPS, BT: tl.constexpr, DYN_LOOP: tl.constexpr):
    """Chunks a scan walks: the segment's own count (DYN_LOOP, compiled kernels), or the plan's CPS for
    every segment (the interpreter needs a plain loop bound; chunks past a segment's end read zeros,
    have zero log-decay and change nothing)."""
    n_chunks = CPS
    if DYN_LOOP:
        n_chunks = tl.cdiv(eos - bos, BT).to(tl.int32)
    return n_chunks


@triton.jit
def _token_tiles(x, bos, eos, i_h, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Tiles of x[bos:eos, i_h, :] (x laid out [tokens, H, D]), BT tokens by BD features. Reads past the
    segment or past D give zeros and writes there are dropped, so chunks of any length need no masks."""
    return tl.make_tensor_descriptor(x + (bos * H + i_h) * D, [eos - bos, D], [H * D, 1], [BT, BD])


@triton.jit
def _dot_f32_right(a, b, DT: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b for a float32 b, rounded to DT for the tensor cores; with SPLIT, b = hi + lo in two products
    (about 16 mantissa bits instead of 8), which the decay gradient needs (see the module docstring)."""
    hi = b.to(DT)
    out = tl.dot(a, hi, input_precision=DOT_PREC)
    if SPLIT:
        out += tl.dot(a, (b - hi.to(tl.float32)).to(DT), input_precision=DOT_PREC)
    return out


@triton.jit
def _dot_f32_left(a, b, DT: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b for a float32 a; see `_dot_f32_right`."""
    hi = a.to(DT)
    out = tl.dot(hi, b, input_precision=DOT_PREC)
    if SPLIT:
        out += tl.dot((a - hi.to(tl.float32)).to(DT), b, input_precision=DOT_PREC)
    return out


@fast
@triton.jit
def _fwd_kernel_segment_state(k, v, g, s_loc, seg_decay, seg_bos, seg_eos, CPS,
                              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                              DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, NV: tl.constexpr,
                              DYN_LOOP: tl.constexpr = False):
    """One program per (segment, head, K block x V block; NV V blocks): the segment's state from zero, and
    its log-decay."""
    i_s, i_h, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // NV, i_kv % NV
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    state = tl.zeros([BK, BV], dtype=tl.float32)
    log_decay = 0.0
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_v = _token_tiles(v, bos, eos, i_h, H, V, BT, BV)
    n_chunks = _num_chunks(bos, eos, CPS, BT, DYN_LOOP)
    for i in range(n_chunks):
        r0 = i * BT
        t0 = bos + r0
        b_k = tiles_k.load([r0, i_k * BK]).to(DT)
        b_v = tiles_v.load([r0, i_v * BV]).to(DT)
        b, b_last, r, r_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        k_decayed = b_k * _decay_out(b, b_last, r, r_last)[:, None]
        state = state * _decay_through(b_last, r_last) + _dot_f32_left(tl.trans(k_decayed), b_v, DT, DOT_PREC, SPLIT)
        log_decay += _log_decay_through(b_last, r_last)
    p_s = s_loc + ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_s, state, mask=m_k[:, None] & m_v[None, :])
    if i_kv == 0:
        tl.store(seg_decay + i_s * H + i_h, log_decay)


@triton.jit
def _scan_load(local, seg_decay, first, num_segs, i, i_h, o, m, H: tl.constexpr, KV: tl.constexpr,
               REVERSE: tl.constexpr):
    """Step i of a segment walk: the segment's flat state offset, mask, tile of `local` and decay factor
    (zeros and 1 past the sequence's segments, which then change nothing)."""
    if REVERSE:
        seg = first + num_segs - 1 - i
    else:
        seg = first + i
    base = (seg * H + i_h).to(tl.int64) * KV
    # A vector mask: the interpreter cannot broadcast a scalar mask against a block.
    mask = m & ((o * 0 + i) < num_segs)
    tile = tl.load(local + base + o, mask=mask, other=0.0)
    decay = tl.exp(tl.load(seg_decay + seg * H + i_h, mask=i < num_segs, other=0.0))
    return base, mask, tile, decay


@triton.jit
def _scan_step(each, state, base, mask, tile, decay, o, STORE_EACH: tl.constexpr):
    if STORE_EACH:
        tl.store(each + base + o, state, mask=mask)
    return state * decay + tile


@fast
@triton.jit(do_not_specialize=["MAX_SEGS"])
def _kernel_segment_scan(local, seg_decay, each, start, end, seq_first_seg, seq_num_segs, MAX_SEGS,
                         H: tl.constexpr, KV: tl.constexpr, BLOCK: tl.constexpr, HAS_START: tl.constexpr,
                         STORE_EACH: tl.constexpr, STORE_END: tl.constexpr, REVERSE: tl.constexpr):
    """One program per (sequence, head, BLOCK elements of the flattened K x V state): the walk over the
    sequence's segments s (in order, or REVERSE) of  state = state * exp(a_s) + local(s)  from `start`
    [N, H, K, V] (or zeros). STORE_EACH writes the state before each segment's step to `each` [S, H, K, V]
    (forward: S_in of every segment; reverse: dL/dS at every segment's end); STORE_END writes the state after
    the last step to `end` [N, H, K, V] (the sequence's final state, or dL/d initial_state in reverse).

    The walk is serial and its work tiny, so it waits on memory: four segments' tiles are loaded before their
    four steps (one wait per four segments), and small blocks give many programs."""
    i_n, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(seq_first_seg + i_n)
    num_segs = tl.load(seq_num_segs + i_n)
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    m = o < KV
    p_seq = (i_n * H + i_h).to(tl.int64) * KV + o
    if HAS_START:
        state = tl.load(start + p_seq, mask=m, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, MAX_SEGS, 4):
        b0, m0, t0, d0 = _scan_load(local, seg_decay, first, num_segs, i, i_h, o, m, H, KV, REVERSE)
        b1, m1, t1, d1 = _scan_load(local, seg_decay, first, num_segs, i + 1, i_h, o, m, H, KV, REVERSE)
        b2, m2, t2, d2 = _scan_load(local, seg_decay, first, num_segs, i + 2, i_h, o, m, H, KV, REVERSE)
        b3, m3, t3, d3 = _scan_load(local, seg_decay, first, num_segs, i + 3, i_h, o, m, H, KV, REVERSE)
        state = _scan_step(each, state, b0, m0, t0, d0, o, STORE_EACH)
        state = _scan_step(each, state, b1, m1, t1, d1, o, STORE_EACH)
        state = _scan_step(each, state, b2, m2, t2, d2, o, STORE_EACH)
        state = _scan_step(each, state, b3, m3, t3, d3, o, STORE_EACH)
    if STORE_END:
        tl.store(end + p_seq, state, mask=m)


@fast
@triton.jit
def _fwd_kernel_output(q, k, v, g, o, s_in, s_end, seg_decay, seg_bos, seg_eos, scale, CPS,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                       DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, DYN_LOOP: tl.constexpr = False):
    """One program per (segment, head, V block): scan the segment's chunks from S_in, writing o."""
    i_s, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    causal = o_t[:, None] >= o_t[None, :]
    p_state = ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    state = tl.load(s_in + p_state, mask=m_k[:, None] & m_v[None, :], other=0.0)
    log_decay = 0.0
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_o = _token_tiles(o, bos, eos, i_h, H, V, BT, BV)
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    tiles_v = _token_tiles(v, bos, eos, i_h, H, V, BT, BV)
    n_chunks = _num_chunks(bos, eos, CPS, BT, DYN_LOOP)
    for i in range(n_chunks):
        r0 = i * BT
        t0 = bos + r0
        b_q = tiles_q.load([r0, 0]).to(DT)
        b_k = tiles_k.load([r0, 0]).to(DT)
        b_v = tiles_v.load([r0, i_v * BV]).to(DT)
        b, b_last, r, r_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        scores = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        scores = tl.where(causal & _same_run(r), scores * tl.exp(b[:, None] - b[None, :]), 0.0)
        b_o = tl.dot(scores.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_o += tl.dot(b_q, state.to(b_q.dtype), input_precision=DOT_PREC) * _decay_in(b, r)[:, None]
        tiles_o.store([r0, i_v * BV], (b_o * scale).to(o.dtype.element_ty))
        k_decayed = b_k * _decay_out(b, b_last, r, r_last)[:, None]
        state = state * _decay_through(b_last, r_last) + _dot_f32_left(tl.trans(k_decayed), b_v, DT, DOT_PREC, SPLIT)
        log_decay += _log_decay_through(b_last, r_last)
    tl.store(s_end + p_state, state, mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(seg_decay + i_s * H + i_h, log_decay)


@fast
@triton.jit
def _bwd_kernel_segment_dstate(q, do, g, ds_loc, seg_decay, seg_bos, seg_eos, scale, CPS,
                               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                               DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, NV: tl.constexpr,
                               STORE_DECAY: tl.constexpr = False, DYN_LOOP: tl.constexpr = False):
    """One program per (segment, head, K block x V block; NV V blocks): dL/dS_in of the segment from its
    own outputs, and (STORE_DECAY) the segment's log-decay."""
    i_s, i_h, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // NV, i_kv % NV
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    log_decay = 0.0
    tiles_do = _token_tiles(do, bos, eos, i_h, H, V, BT, BV)
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    n_chunks = _num_chunks(bos, eos, CPS, BT, DYN_LOOP)
    for i in range(n_chunks):
        r0 = (n_chunks - 1 - i) * BT
        t0 = bos + r0
        b_q = tiles_q.load([r0, i_k * BK]).to(DT)
        b_do = tiles_do.load([r0, i_v * BV]).to(DT)
        b, b_last, r, r_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        # scale is applied once to the float32 sum below, not to q here: q * scale rounded back to the
        # operand type would add a rounding (~2^-9 relative in bf16) that an exact product avoids.
        if G_MODE == 0:
            dstate += tl.dot(tl.trans(b_q), b_do, input_precision=DOT_PREC)
        else:
            q_decayed = b_q * _decay_in(b, r)[:, None]
            dstate = dstate * _decay_through(b_last, r_last) + _dot_f32_left(tl.trans(q_decayed), b_do, DT, DOT_PREC, SPLIT)
        log_decay += _log_decay_through(b_last, r_last)
    p_s = ds_loc + ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_s, dstate * scale, mask=m_k[:, None] & m_v[None, :])
    if STORE_DECAY and i_kv == 0:
        tl.store(seg_decay + i_s * H + i_h, log_decay)


@fast
@triton.jit(do_not_specialize=["NUM_TOKENS"])
def _bwd_kernel_dk(q, k, v, g, do, dk, kdk, ds_out, ds_start, seg_bos, seg_eos, scale, CPS, NUM_TOKENS,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                   DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, NEED_DG: tl.constexpr, STORE_START: tl.constexpr,
                   DYN_LOOP: tl.constexpr = False):
    """One program per (segment, head, K block), with all of V: reverse scan from dS at the segment's end
    (rows of this K block), writing dk for the block, its share of k . dk (NEED_DG) and dS at the segment's
    start (STORE_START)."""
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
    kdk_part = kdk + i_k.to(tl.int64) * NUM_TOKENS * H
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_dk = _token_tiles(dk, bos, eos, i_h, H, K, BT, BK)
    tiles_v = _token_tiles(v, bos, eos, i_h, H, V, BT, BV)
    tiles_do = _token_tiles(do, bos, eos, i_h, H, V, BT, BV)
    n_chunks = _num_chunks(bos, eos, CPS, BT, DYN_LOOP)
    for i in range(n_chunks):
        r0 = (n_chunks - 1 - i) * BT
        t0 = bos + r0
        m_t = o_t < eos - t0
        b_q = tiles_q.load([r0, i_k * BK]).to(DT)
        b_v = tiles_v.load([r0, 0]).to(DT)
        b_do = tiles_do.load([r0, 0]).to(DT)
        b, b_last, r, r_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        dscores = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        dscores = tl.where(causal, dscores * (_pair_decay(b, r) * scale), 0.0)
        dk_state = _dot_f32_right(b_v, tl.trans(dstate), DT, DOT_PREC, SPLIT) * _decay_out(b, b_last, r, r_last)[:, None]
        b_dk = tl.dot(tl.trans(dscores.to(DT)), b_q, input_precision=DOT_PREC) + dk_state
        tiles_dk.store([r0, i_k * BK], b_dk.to(dk.dtype.element_ty))
        if NEED_DG:
            # Only the state part of k . dk: the chunk's own pairs enter through the dq kernel.
            b_k = tiles_k.load([r0, i_k * BK]).to(DT)
            tl.store(kdk_part + t0 * H + i_h + o_t * H, tl.sum(b_k * dk_state, 1), mask=m_t)
        q_decayed = b_q * (_decay_in(b, r) * scale)[:, None]
        dstate = dstate * _decay_through(b_last, r_last) + _dot_f32_left(tl.trans(q_decayed), b_do, DT, DOT_PREC, SPLIT)
    if STORE_START:
        tl.store(ds_start + p_state, dstate, mask=m_kv)


@fast
@triton.jit
def _bwd_kernel_dv(q, k, g, do, dv, ds_out, seg_bos, seg_eos, scale, CPS,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                   DOT_PREC: tl.constexpr, DYN_LOOP: tl.constexpr = False):
    """One program per (segment, head, V block), with all of K: reverse scan from dS at the segment's end
    (columns of this V block), writing dv for the block."""
    i_s, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    causal = o_t[:, None] >= o_t[None, :]
    p_state = ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    dstate = tl.load(ds_out + p_state, mask=m_kv, other=0.0)
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_do = _token_tiles(do, bos, eos, i_h, H, V, BT, BV)
    tiles_dv = _token_tiles(dv, bos, eos, i_h, H, V, BT, BV)
    n_chunks = _num_chunks(bos, eos, CPS, BT, DYN_LOOP)
    for i in range(n_chunks):
        r0 = (n_chunks - 1 - i) * BT
        t0 = bos + r0
        b_q = tiles_q.load([r0, 0]).to(DT)
        b_k = tiles_k.load([r0, 0]).to(DT)
        b_do = tiles_do.load([r0, i_v * BV]).to(DT)
        b, b_last, r, r_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        scores = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        scores = tl.where(causal, scores * (_pair_decay(b, r) * scale), 0.0)
        b_dv = tl.dot(tl.trans(scores.to(DT)), b_do, input_precision=DOT_PREC)
        b_dv += tl.dot(b_k, dstate.to(DT), input_precision=DOT_PREC) * _decay_out(b, b_last, r, r_last)[:, None]
        tiles_dv.store([r0, i_v * BV], b_dv.to(dv.dtype.element_ty))
        q_decayed = (b_q * (_decay_in(b, r) * scale)[:, None]).to(DT)
        dstate = dstate * _decay_through(b_last, r_last) + tl.dot(tl.trans(q_decayed), b_do, input_precision=DOT_PREC)


@fast
@triton.jit(do_not_specialize=["NUM_TOKENS"])
def _bwd_kernel_dq(q, k, v, g, do, dq, qdq, s_in, seg_bos, seg_eos, scale, CPS, NUM_TOKENS,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                   DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, NEED_DG: tl.constexpr,
                   DYN_LOOP: tl.constexpr = False):
    """One program per (segment, head, K block), with all of V: forward scan from S_in (rows of this K
    block), writing dq for the block and its share of q . dq."""
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
    qdq_part = qdq + i_k.to(tl.int64) * NUM_TOKENS * H
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_dq = _token_tiles(dq, bos, eos, i_h, H, K, BT, BK)
    tiles_v = _token_tiles(v, bos, eos, i_h, H, V, BT, BV)
    tiles_do = _token_tiles(do, bos, eos, i_h, H, V, BT, BV)
    n_chunks = _num_chunks(bos, eos, CPS, BT, DYN_LOOP)
    for i in range(n_chunks):
        r0 = i * BT
        t0 = bos + r0
        m_t = o_t < eos - t0
        b_k = tiles_k.load([r0, i_k * BK]).to(DT)
        b_v = tiles_v.load([r0, 0]).to(DT)
        b_do = tiles_do.load([r0, 0]).to(DT)
        b, b_last, r, r_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        dscores = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        dscores = tl.where(causal, dscores * _pair_decay(b, r), 0.0)
        dq_state = _dot_f32_right(b_do, tl.trans(state), DT, DOT_PREC, SPLIT) * (_decay_in(b, r) * scale)[:, None]
        b_dq = tl.dot(dscores.to(DT), b_k, input_precision=DOT_PREC) * scale + dq_state
        tiles_dq.store([r0, i_k * BK], b_dq.to(dq.dtype.element_ty))
        if NEED_DG:
            # dL/dB_t = q.dq - k.dk. Within the chunk that is row minus column sums of
            # A = (q k^T) * (do v^T) * decay * scale, formed in float32 from the inputs (this K block's
            # share of q k^T), so the large terms that cancel in q.dq - k.dk carry no bf16 rounding.
            b_q = tiles_q.load([r0, i_k * BK]).to(DT)
            pairs = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * dscores * scale
            d_log = tl.sum(pairs, 1) - tl.sum(pairs, 0) + tl.sum(b_q * dq_state, 1)
            tl.store(qdq_part + t0 * H + i_h + o_t * H, d_log, mask=m_t)
        k_decayed = b_k * _decay_out(b, b_last, r, r_last)[:, None]
        state = state * _decay_through(b_last, r_last) + _dot_f32_left(tl.trans(k_decayed), b_v, DT, DOT_PREC, SPLIT)
