"""Chunked linear attention with decay in Triton: forward, backward and the autograd wrapper.

Shapes: B batch, T tokens, H heads, K key/query head dim, V value head dim, N sequences (B for
dense input, the packed count with cu_seqlens), BT chunk length (64), S segments.

The math is that of `lasp_hf.kernels.reference` (per chunk, b the cumulative log-decay from the
chunk's start, causal mask M):
    o     = scale * ( (q k^T * M * exp(b_i - b_j)) v + exp(b) * (q S_prev) )
    S_new = exp(b_last) S_prev + (k * exp(b_last - b))^T v
Dense input is treated as B packed sequences of length T, so every kernel sees one flat token axis.

Work is split into segments (runs of consecutive chunks of one sequence) to fill the GPU when B*H
is small, with LASP's decomposition inside one device:
  1. `_fwd_kernel_segment_state`: each segment's state from a zero start, and its total log-decay;
  2. `_fwd_kernel_segment_combine`: S_in(s) = exp(a_{s-1}) S_in(s-1) + S_loc(s-1), per sequence;
  3. `_fwd_kernel_output`: each segment scans its chunks from S_in(s) and writes o.
When every sequence fits one segment (B*H already fills the GPU), steps 1-2 are skipped.
Backward mirrors it: the segments' local dS (reverse scan over q, do), a reverse combine giving
dS at each segment's end (and d initial_state), then a reverse scan for dk, dv and a forward scan
for dq. With B the cumulative log-decay from a sequence's start, the decay gradient follows from
    dL/dB_t = q_t . dq_t - k_t . dk_t  (+ <dS_final, S_final> at the sequence's last token),
    dg_t = sum_{u >= t} dL/dB_u        (a reverse cumulative sum within each sequence),
since o and S_final depend on B only through q_t exp(B_t), k_u exp(-B_u) and exp(B_last).
q.dq and k.dk are large and nearly cancel, and the reverse sum carries their rounding over the whole
sequence, so with bf16 / fp16 inputs the terms are formed more exactly when g needs a gradient: a chunk's
own pairs as row minus column sums of A = (q k^T) * (do v^T) * decay in float32, and the state products
with the float32 state split into two bf16 halves (`_dot_f32_left` / `_dot_f32_right`, SPLIT).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lasp_hf.kernels.triton.utils import empty, interpreting

CHUNK_SIZE = 64
# Per pass: (largest K x V state tile one program holds, in float32 elements; num_warps; num_stages).
# A program always holds the whole K axis, so the tile sets the V block. Measured in notes-kernels.md.
CONFIGS = {"fwd": (8192, 4, 2), "bwd": (8192, 4, 2)}
# Segments are planned for about this many programs per SM when B*H alone does not fill the device.
PROGRAMS_PER_SM = 4
# Set (e.g. by tests) to force a number of chunks per segment; None plans it from the device.
CHUNKS_PER_SEGMENT = None
# float32 inputs: three tf32 products per dot (about float32 accuracy on the tensor cores); "ieee" is
# exact but runs the products on the FMA units.
FP32_DOT_PRECISION = "tf32x3"
G_NONE, G_HEAD, G_TOKEN = 0, 1, 2


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _chunk_decay(g, i_h, t0, length, H: tl.constexpr, G_MODE: tl.constexpr, BT: tl.constexpr):
    """b (cumulative log-decay inside the chunk, [BT]) and b_last for the chunk starting at t0."""
    o_t = tl.arange(0, BT)
    m_t = o_t < length
    if G_MODE == 1:
        g_vec = tl.where(m_t, tl.load(g + i_h).to(tl.float32), 0.0)
    elif G_MODE == 2:
        g_vec = tl.load(g + t0 * H + i_h + o_t * H, mask=m_t, other=0.0).to(tl.float32)
    else:
        g_vec = tl.zeros([BT], dtype=tl.float32)
    return tl.cumsum(g_vec, 0), tl.sum(g_vec, 0)


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


@triton.jit
def _fwd_kernel_segment_state(k, v, g, s_loc, seg_decay, seg_bos, seg_eos, CPS,
                              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                              DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """One program per (segment, head, V block): the segment's state from zero, and its log-decay."""
    i_s, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    state = tl.zeros([BK, BV], dtype=tl.float32)
    log_decay = 0.0
    tiles_k = _token_tiles(k, bos, eos, i_h, H, K, BT, BK)
    tiles_v = _token_tiles(v, bos, eos, i_h, H, V, BT, BV)
    for i in range(CPS):
        r0 = i * BT
        t0 = bos + r0
        m_t = o_t < eos - t0
        b_k = tiles_k.load([r0, 0]).to(DT)
        b_v = tiles_v.load([r0, i_v * BV]).to(DT)
        b, b_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        k_decayed = b_k * tl.exp(b_last - b)[:, None]
        state = state * tl.exp(b_last) + _dot_f32_left(tl.trans(k_decayed), b_v, DT, DOT_PREC, SPLIT)
        log_decay += b_last
    p_s = s_loc + ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_s, state, mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(seg_decay + i_s * H + i_h, log_decay)


@triton.jit
def _fwd_kernel_segment_combine(s_loc, seg_decay, s_in, h0, seq_first_seg, seq_num_segs, MAX_SEGS,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                                BV: tl.constexpr, HAS_INIT: tl.constexpr):
    """One program per (sequence, head, V block): S_in of each segment, scanning segments in order."""
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(seq_first_seg + i_n)
    num_segs = tl.load(seq_num_segs + i_n)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    o_kv = o_k[:, None] * V + o_v[None, :]
    if HAS_INIT:
        state = tl.load(h0 + ((i_n * H + i_h) * K).to(tl.int64) * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(MAX_SEGS):
        valid = num_segs > i
        # A vector mask: the interpreter cannot broadcast a scalar mask against a block.
        m_seg = m_kv & ((o_k * 0 + i) < num_segs)[:, None]
        base = (((first + i) * H + i_h) * K).to(tl.int64) * V
        tl.store(s_in + base + o_kv, state, mask=m_seg)
        local = tl.load(s_loc + base + o_kv, mask=m_seg, other=0.0)
        decay = tl.exp(tl.load(seg_decay + (first + i) * H + i_h, mask=valid, other=0.0))
        state = state * decay + local


@triton.jit
def _fwd_kernel_output(q, k, v, g, o, s_in, s_end, seg_decay, seg_bos, seg_eos, scale, CPS,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                       DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
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
    for i in range(CPS):
        r0 = i * BT
        t0 = bos + r0
        m_t = o_t < eos - t0
        b_q = tiles_q.load([r0, 0]).to(DT)
        b_k = tiles_k.load([r0, 0]).to(DT)
        b_v = tiles_v.load([r0, i_v * BV]).to(DT)
        b, b_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        scores = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        scores = tl.where(causal, scores * tl.exp(b[:, None] - b[None, :]), 0.0)
        b_o = tl.dot(scores.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_o += tl.dot(b_q, state.to(b_q.dtype), input_precision=DOT_PREC) * tl.exp(b)[:, None]
        tiles_o.store([r0, i_v * BV], (b_o * scale).to(o.dtype.element_ty))
        k_decayed = b_k * tl.exp(b_last - b)[:, None]
        state = state * tl.exp(b_last) + _dot_f32_left(tl.trans(k_decayed), b_v, DT, DOT_PREC, SPLIT)
        log_decay += b_last
    tl.store(s_end + p_state, state, mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(seg_decay + i_s * H + i_h, log_decay)


@triton.jit
def _bwd_kernel_segment_dstate(q, do, g, ds_loc, seg_bos, seg_eos, scale, CPS,
                               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                               DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """One program per (segment, head, V block): dL/dS_in of the segment from its own outputs."""
    i_s, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(seg_bos + i_s).to(tl.int64)
    eos = tl.load(seg_eos + i_s).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    tiles_do = _token_tiles(do, bos, eos, i_h, H, V, BT, BV)
    tiles_q = _token_tiles(q, bos, eos, i_h, H, K, BT, BK)
    for i in range(CPS):
        r0 = (CPS - 1 - i) * BT
        t0 = bos + r0
        m_t = o_t < eos - t0
        b_q = tiles_q.load([r0, 0]).to(DT)
        b_do = tiles_do.load([r0, i_v * BV]).to(DT)
        b, b_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        q_decayed = b_q * (tl.exp(b) * scale)[:, None]
        dstate = dstate * tl.exp(b_last) + _dot_f32_left(tl.trans(q_decayed), b_do, DT, DOT_PREC, SPLIT)
    p_s = ds_loc + ((i_s * H + i_h) * K).to(tl.int64) * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_s, dstate, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _bwd_kernel_segment_combine(ds_loc, seg_decay, ds_out, dht, dh0, seq_first_seg, seq_num_segs, MAX_SEGS,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                                BV: tl.constexpr, HAS_DFINAL: tl.constexpr):
    """One program per (sequence, head, V block): dL/dS at each segment's end, scanning backwards;
    what is left at the sequence's start is dL/d initial_state."""
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(seq_first_seg + i_n)
    num_segs = tl.load(seq_num_segs + i_n)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_seq = ((i_n * H + i_h) * K).to(tl.int64) * V + o_kv
    if HAS_DFINAL:
        dstate = tl.load(dht + p_seq, mask=m_kv, other=0.0).to(tl.float32)
    else:
        dstate = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(MAX_SEGS):
        valid = num_segs > i
        m_seg = m_kv & ((o_k * 0 + i) < num_segs)[:, None]
        seg = first + num_segs - 1 - i
        base = ((seg * H + i_h) * K).to(tl.int64) * V
        tl.store(ds_out + base + o_kv, dstate, mask=m_seg)
        local = tl.load(ds_loc + base + o_kv, mask=m_seg, other=0.0)
        decay = tl.exp(tl.load(seg_decay + seg * H + i_h, mask=valid, other=0.0))
        dstate = dstate * decay + local
    tl.store(dh0 + p_seq, dstate, mask=m_kv)


@triton.jit
def _bwd_kernel_dk(q, k, v, g, do, dk, kdk, ds_out, ds_start, seg_bos, seg_eos, scale, CPS, NUM_TOKENS,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                   DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, NEED_DG: tl.constexpr):
    """One program per (segment, head, K block), with all of V: reverse scan from dS at the segment's end
    (rows of this K block), writing dk for the block, its share of k . dk and dS at the segment's start."""
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
    for i in range(CPS):
        r0 = (CPS - 1 - i) * BT
        t0 = bos + r0
        m_t = o_t < eos - t0
        b_q = tiles_q.load([r0, i_k * BK]).to(DT)
        b_v = tiles_v.load([r0, 0]).to(DT)
        b_do = tiles_do.load([r0, 0]).to(DT)
        b, b_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        dscores = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        dscores = tl.where(causal, dscores * (tl.exp(b[:, None] - b[None, :]) * scale), 0.0)
        dk_state = _dot_f32_right(b_v, tl.trans(dstate), DT, DOT_PREC, SPLIT) * tl.exp(b_last - b)[:, None]
        b_dk = tl.dot(tl.trans(dscores.to(DT)), b_q, input_precision=DOT_PREC) + dk_state
        tiles_dk.store([r0, i_k * BK], b_dk.to(dk.dtype.element_ty))
        if NEED_DG:
            # Only the state part of k . dk: the chunk's own pairs enter through the dq kernel.
            b_k = tiles_k.load([r0, i_k * BK]).to(DT)
            tl.store(kdk_part + t0 * H + i_h + o_t * H, tl.sum(b_k * dk_state, 1), mask=m_t)
        q_decayed = b_q * (tl.exp(b) * scale)[:, None]
        dstate = dstate * tl.exp(b_last) + _dot_f32_left(tl.trans(q_decayed), b_do, DT, DOT_PREC, SPLIT)
    tl.store(ds_start + p_state, dstate, mask=m_kv)


@triton.jit
def _bwd_kernel_dv(q, k, g, do, dv, ds_out, seg_bos, seg_eos, scale, CPS,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                   DOT_PREC: tl.constexpr):
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
    for i in range(CPS):
        r0 = (CPS - 1 - i) * BT
        t0 = bos + r0
        b_q = tiles_q.load([r0, 0]).to(DT)
        b_k = tiles_k.load([r0, 0]).to(DT)
        b_do = tiles_do.load([r0, i_v * BV]).to(DT)
        b, b_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        scores = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        scores = tl.where(causal, scores * (tl.exp(b[:, None] - b[None, :]) * scale), 0.0)
        b_dv = tl.dot(tl.trans(scores.to(DT)), b_do, input_precision=DOT_PREC)
        b_dv += tl.dot(b_k, dstate.to(DT), input_precision=DOT_PREC) * tl.exp(b_last - b)[:, None]
        tiles_dv.store([r0, i_v * BV], b_dv.to(dv.dtype.element_ty))
        q_decayed = (b_q * (tl.exp(b) * scale)[:, None]).to(DT)
        dstate = dstate * tl.exp(b_last) + tl.dot(tl.trans(q_decayed), b_do, input_precision=DOT_PREC)


@triton.jit
def _bwd_kernel_dq(q, k, v, g, do, dq, qdq, s_in, seg_bos, seg_eos, scale, CPS, NUM_TOKENS,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                   DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, NEED_DG: tl.constexpr):
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
    for i in range(CPS):
        r0 = i * BT
        t0 = bos + r0
        m_t = o_t < eos - t0
        b_k = tiles_k.load([r0, i_k * BK]).to(DT)
        b_v = tiles_v.load([r0, 0]).to(DT)
        b_do = tiles_do.load([r0, 0]).to(DT)
        b, b_last = _chunk_decay(g, i_h, t0, eos - t0, H, G_MODE, BT)
        dscores = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        dscores = tl.where(causal, dscores * tl.exp(b[:, None] - b[None, :]), 0.0)
        dq_state = _dot_f32_right(b_do, tl.trans(state), DT, DOT_PREC, SPLIT) * (tl.exp(b) * scale)[:, None]
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
        k_decayed = b_k * tl.exp(b_last - b)[:, None]
        state = state * tl.exp(b_last) + _dot_f32_left(tl.trans(k_decayed), b_v, DT, DOT_PREC, SPLIT)


# ----------------------------------------------------------------------------- launchers

class _Plan:
    """How the flat token axis is cut: segments of at most `chunks_per_segment` chunks, each inside one
    sequence. Tables are int32 on the tensors' device."""

    def __init__(self, bounds: list[int], device, chunks_per_segment: int):
        lengths = torch.tensor(bounds[1:], dtype=torch.int64) - torch.tensor(bounds[:-1], dtype=torch.int64)
        span = chunks_per_segment * CHUNK_SIZE
        num_segs = (lengths + span - 1) // span
        first_seg = torch.cumsum(num_segs, 0) - num_segs
        seg_seq = torch.repeat_interleave(torch.arange(len(lengths)), num_segs)
        seg_local = torch.arange(int(num_segs.sum())) - first_seg[seg_seq]
        starts = torch.tensor(bounds[:-1], dtype=torch.int64)
        seg_bos = starts[seg_seq] + seg_local * span
        seg_eos = torch.minimum(seg_bos + span, starts[seg_seq] + lengths[seg_seq])
        self.num_seqs = len(lengths)
        self.num_segs = int(num_segs.sum())
        self.max_segs = int(num_segs.max()) if len(lengths) else 0
        self.chunks_per_segment = chunks_per_segment
        self.nonempty = (num_segs > 0).to(device)
        self.first_seg_index = first_seg.clamp(max=max(self.num_segs - 1, 0)).to(device)
        self.last_seg_index = (first_seg + num_segs - 1).clamp(min=0).to(device)
        to_dev = functools.partial(torch.as_tensor, dtype=torch.int32, device=device)
        self.seg_bos, self.seg_eos = to_dev(seg_bos), to_dev(seg_eos)
        self.seq_first_seg, self.seq_num_segs = to_dev(first_seg), to_dev(num_segs)
        self.seg_seq = seg_seq.to(device)
        self.lengths = lengths


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _blocks(K: int, V: int, phase: str) -> tuple[int, int]:
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), max(16, CONFIGS[phase][0] // BK))
    return BK, BV


def _blocks_k(K: int, V: int, phase: str) -> tuple[int, int]:
    """(K block, whole V) for the kernels that hold rows of the state."""
    BV = max(16, triton.next_power_of_2(V))
    BK = min(max(16, triton.next_power_of_2(K)), max(16, CONFIGS[phase][0] // BV))
    return BK, BV


def _make_plan(bounds: list[int], H: int, NV: int, device) -> _Plan:
    """Chunks per segment: one segment per sequence when the (sequence, head, V block) programs already
    fill the device; otherwise enough segments for about two programs per SM."""
    max_chunks = max((b - a + CHUNK_SIZE - 1) // CHUNK_SIZE for a, b in zip(bounds[:-1], bounds[1:]))
    max_chunks = max(max_chunks, 1)
    if CHUNKS_PER_SEGMENT is not None:
        cps = CHUNKS_PER_SEGMENT
    else:
        programs = (len(bounds) - 1) * H * NV
        sms = _num_sms(device)
        splits = 1 if programs >= sms else min(max_chunks, triton.cdiv(PROGRAMS_PER_SM * sms, programs))
        cps = triton.cdiv(max_chunks, splits)
    return _Plan(bounds, device, cps)


@functools.lru_cache(maxsize=64)
def _dense_plan(B: int, T: int, H: int, NV: int, device, knobs) -> _Plan:
    return _make_plan([b * T for b in range(B + 1)], H, NV, device)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _config(phase: str, dtype, BK: int) -> dict:
    if interpreting():
        return {}
    # Tensor descriptors made inside kernels need a little global scratch memory per launch. Triton keeps
    # the allocator in a context variable, so it is set on every call: backward runs in autograd's thread.
    triton.set_allocator(_scratch)
    _, num_warps, num_stages = CONFIGS[phase]
    if BK >= 256:
        num_warps = max(num_warps, 8)   # 64 x 256 q and k tiles spill heavily with 4 warps
    if dtype == torch.float32:
        # float32 tiles are twice as large: a second pipeline stage would not fit in shared memory.
        num_stages = 1
    return {"num_warps": num_warps, "num_stages": num_stages}


def _dot_dtype(dtype):
    """Operand type of the matrix products: the input's, except in the interpreter, whose bfloat16
    arithmetic is wrong (Triton 3.9: products of bfloat16 blocks come out as garbage), so it gets float32."""
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return tl.float16 if dtype == torch.float16 else tl.float32


def _dot_precision(dtype) -> str:
    # bf16 / fp16 operands ignore it; float32 must not fall to plain tf32 (~3e-4 relative error).
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned start, as tensor descriptors (TMA) require."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _g_mode(g) -> int:
    if g is None:
        return G_NONE
    return G_HEAD if g.dim() == 1 else G_TOKEN


def _launch_fwd(q, k, v, g, scale, h0, plan: _Plan, accurate_states: bool):
    """q, k: [NT, H, K]; v: [NT, H, V]; g: None, [H] or [NT, H] float32; h0: None or [N, H, K, V].
    accurate_states: states to ~16 mantissa bits with bf16/fp16 inputs (when dg will be needed). Returns o [NT, H, V], S_in and S_end per segment [S, H, K, V] and the segments' log-decays [S, H]."""
    NT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V, "fwd")
    NV = triton.cdiv(V, BV)
    S = plan.num_segs
    cfg = _config("fwd", q.dtype, BK)
    meta = dict(H=H, K=K, V=V, BK=BK, BV=BV)
    scan = dict(G_MODE=_g_mode(g), BT=CHUNK_SIZE, DT=_dot_dtype(q.dtype), DOT_PREC=_dot_precision(q.dtype),
                SPLIT=accurate_states and q.dtype != torch.float32, **meta)
    g_arg = g if g is not None else q
    seg_decay = empty(q, (S, H), torch.float32)
    if plan.max_segs > 1:
        s_loc = empty(q, (S, H, K, V), torch.float32)
        _fwd_kernel_segment_state[(S, H, NV)](
            k, v, g_arg, s_loc, seg_decay, plan.seg_bos, plan.seg_eos, plan.chunks_per_segment, **scan, **cfg)
        s_in = empty(s_loc, s_loc.shape, s_loc.dtype)
        _fwd_kernel_segment_combine[(plan.num_seqs, H, NV)](
            s_loc, seg_decay, s_in, h0 if h0 is not None else s_loc, plan.seq_first_seg, plan.seq_num_segs,
            plan.max_segs, HAS_INIT=h0 is not None, **meta, **cfg)
    elif h0 is not None:
        s_in = h0.float()[plan.seg_seq].contiguous()
    else:
        s_in = q.new_zeros(S, H, K, V, dtype=torch.float32)
    o = empty(v, v.shape, v.dtype)
    s_end = empty(s_in, s_in.shape, s_in.dtype)
    _fwd_kernel_output[(S, H, NV)](
        q, k, v, g_arg, o, s_in, s_end, seg_decay, plan.seg_bos, plan.seg_eos, scale, plan.chunks_per_segment,
        **scan, **cfg)
    return o, s_in, s_end, seg_decay


def _launch_bwd(q, k, v, g, do, dht, scale, s_in, seg_decay, plan: _Plan, need_dg: bool):
    """Returns dq, dk, dv (in q's dtype), dL/dB per token [NT, H] (float32) and dh0 [N, H, K, V]."""
    NT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V, "bwd")
    NV = triton.cdiv(V, BV)
    S = plan.num_segs
    cfg = _config("bwd", q.dtype, BK)
    meta = dict(H=H, K=K, V=V, BK=BK, BV=BV)
    scan = dict(G_MODE=_g_mode(g), BT=CHUNK_SIZE, DT=_dot_dtype(q.dtype), DOT_PREC=_dot_precision(q.dtype),
                SPLIT=need_dg and q.dtype != torch.float32, **meta)
    g_arg = g if g is not None else q
    if plan.max_segs > 1:
        ds_loc = empty(q, (S, H, K, V), torch.float32)
        _bwd_kernel_segment_dstate[(S, H, NV)](
            q, do, g_arg, ds_loc, plan.seg_bos, plan.seg_eos, scale, plan.chunks_per_segment, **scan, **cfg)
        ds_out = empty(ds_loc, ds_loc.shape, ds_loc.dtype)
        dh0 = empty(q, (plan.num_seqs, H, K, V), torch.float32)
        _bwd_kernel_segment_combine[(plan.num_seqs, H, NV)](
            ds_loc, seg_decay, ds_out, dht if dht is not None else ds_loc, dh0, plan.seq_first_seg,
            plan.seq_num_segs, plan.max_segs, HAS_DFINAL=dht is not None, **meta, **cfg)
    elif dht is not None:
        ds_out = dht.float()[plan.seg_seq].contiguous()
        dh0 = None
    else:
        ds_out = q.new_zeros(S, H, K, V, dtype=torch.float32)
        dh0 = None
    # dv is blocked over V (it sums over K); dk and dq over K (they sum over V), so every program writes
    # finished gradients and only the per-token decay terms are summed over blocks.
    BKK, BVF = _blocks_k(K, V, "bwd")
    NK = triton.cdiv(K, BKK)
    scan_k = dict(scan, BK=BKK, BV=BVF)
    scan_v = {name: value for name, value in scan.items() if name != "SPLIT"}
    dq = empty(q, q.shape, q.dtype)
    dk = empty(k, k.shape, k.dtype)
    dv = empty(v, v.shape, v.dtype)
    qdq = empty(q, (NK, NT, H) if need_dg else (1,), torch.float32)
    kdk = empty(q, (NK, NT, H) if need_dg else (1,), torch.float32)
    ds_start = empty(ds_out, ds_out.shape, ds_out.dtype)
    _bwd_kernel_dv[(S, H, NV)](
        q, k, g_arg, do, dv, ds_out, plan.seg_bos, plan.seg_eos, scale, plan.chunks_per_segment, **scan_v, **cfg)
    _bwd_kernel_dk[(S, H, NK)](
        q, k, v, g_arg, do, dk, kdk, ds_out, ds_start, plan.seg_bos, plan.seg_eos, scale,
        plan.chunks_per_segment, NT, NEED_DG=need_dg, **scan_k, **cfg)
    _bwd_kernel_dq[(S, H, NK)](
        q, k, v, g_arg, do, dq, qdq, s_in, plan.seg_bos, plan.seg_eos, scale, plan.chunks_per_segment, NT,
        NEED_DG=need_dg, **scan_k, **cfg)
    if dh0 is None:
        dh0 = ds_start[plan.first_seg_index]
        if dht is not None:
            dh0 = torch.where(plan.nonempty.view(-1, 1, 1, 1), dh0, dht.float())
        else:
            dh0 = dh0 * plan.nonempty.view(-1, 1, 1, 1)
    dlogdecay = qdq.sum(0) - kdk.sum(0) if need_dg else None
    return dq, dk, dv, dlogdecay, dh0


# ----------------------------------------------------------------------------- forward / backward

def chunk_linear_attention_fwd(q, k, v, g, scale, h0, plan: _Plan, accurate_states: bool = False):
    """Flat inputs (see `_launch_fwd`). Returns o, the final state [N, H, K, V] and what backward needs."""
    o, s_in, s_end, seg_decay = _launch_fwd(q, k, v, g, scale, h0, plan, accurate_states)
    final = s_end[plan.last_seg_index]
    keep = plan.nonempty.view(-1, 1, 1, 1)
    final = torch.where(keep, final, h0.float() if h0 is not None else torch.zeros_like(final))
    return o, final, s_in, seg_decay


def _reverse_cumsum_per_sequence(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """sum_{u >= t, u in t's sequence} x_u for x [NT, H]."""
    total = x.double().flip(0).cumsum(0).flip(0)
    after = torch.cat([total, total.new_zeros(1, x.shape[1])])
    ends = torch.repeat_interleave(torch.cumsum(plan.lengths, 0), plan.lengths).to(x.device)
    return (total - after[ends]).float()


def chunk_linear_attention_bwd(q, k, v, g, do, dht, scale, s_in, seg_decay, final, plan: _Plan, need_dg: bool):
    dq, dk, dv, dlogdecay, dh0 = _launch_bwd(q, k, v, g, do, dht, scale, s_in, seg_decay, plan, need_dg)
    dg = None
    if need_dg:
        if dht is not None:
            # The final state depends on B at each sequence's last token through exp(B_last).
            last_token = torch.cumsum(plan.lengths, 0) - 1
            nonempty = plan.lengths > 0
            final_term = (dht.float() * final).sum((-1, -2))[nonempty.to(final.device)]
            dlogdecay = dlogdecay.index_add(0, last_token[nonempty].to(q.device), final_term)
        dg = _reverse_cumsum_per_sequence(dlogdecay, plan)
        if g.dim() == 1:
            dg = dg.sum(0)
    return dq, dk, dv, dg, dh0


class ChunkLinearAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, plan, output_final_state):
        g32 = g.float().contiguous() if g is not None else None
        need_dg = g is not None and ctx.needs_input_grad[3]
        o, final, s_in, seg_decay = chunk_linear_attention_fwd(q, k, v, g32, scale, h0, plan, need_dg)
        ctx.save_for_backward(q, k, v, g32, s_in, seg_decay, final)
        ctx.scale, ctx.plan = scale, plan
        ctx.g_dtype = g.dtype if g is not None else None
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        return o, (final if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g32, s_in, seg_decay, final = ctx.saved_tensors
        need_dg = g32 is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dg, dh0 = chunk_linear_attention_bwd(
            q, k, v, g32, _aligned(do), dht.contiguous() if dht is not None else None, ctx.scale, s_in,
            seg_decay, final, ctx.plan, need_dg)
        dg = dg.to(ctx.g_dtype) if dg is not None else None
        dh0 = dh0.to(ctx.h0_dtype) if ctx.needs_input_grad[4] else None
        return dq, dk, dv, dg, dh0, None, None, None


# ----------------------------------------------------------------------------- public function

def chunk_linear_attention(q, k, v, g=None, *, scale: float, initial_state=None, output_final_state=False,
                           cu_seqlens=None):
    """Triton backend of `lasp_hf.linear_attention` (inputs already validated by `lasp_hf.ops`).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (float32, bfloat16 or float16; K, V multiples of 16 up to 256).
        g: None, [H] or [B, T, H] natural-log decay (<= 0).
        scale: multiplies q.
        initial_state: None or [B, H, K, V] ([N, H, K, V] with cu_seqlens).
        output_final_state: also return the float32 state after the last token.
        cu_seqlens: None or int [N + 1] with B == 1: packed sequences.
    Returns:
        o [B, T, H, V] in v's dtype, and the final state float32 [B or N, H, K, V] or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    NV = triton.cdiv(V, _blocks(K, V, "fwd")[1])
    if cu_seqlens is None:
        plan = _dense_plan(B, T, H, NV, q.device, (CHUNKS_PER_SEGMENT, PROGRAMS_PER_SM))
    else:
        plan = _make_plan([int(x) for x in cu_seqlens.tolist()], H, NV, q.device)
    flat = [_aligned(x.reshape(B * T, H, x.shape[-1])) for x in (q, k, v)]
    g_flat = g.reshape(B * T, H) if (g is not None and g.dim() == 3) else g
    h0 = initial_state.contiguous() if initial_state is not None else None
    o, final = ChunkLinearAttentionFunction.apply(*flat, g_flat, h0, scale, plan, output_final_state)
    return o.view(B, T, H, V), final
