"""Fused projections of the decoding step (one token per batch row; inference only, no autograd).

A decoding step of a block reads every weight once for a handful of rows, so its time is the weights' bytes plus
one launch per kernel; eager PyTorch spends about half of it on the launches of small elementwise kernels (norms,
activations, gates, residual adds) between the matrix-vector products. `fused_linear` folds those into the product
that reads them: a block's step becomes four launches (q / k / v / gate projections, the output projection, the
GLU's two projections, its down projection) plus the recurrent step, in eager decoding and in the CUDA graph alike
(both run this code, so the graph replays exactly what eager decoding computes).

Shapes: M rows (the batch), D input features, N_i output features of weight i.

    x' = prologue(x):   x / rms(x) over groups of G features (G = D, or one head), times a norm weight [G] (tiled
                        over D), times a gate [M, D]; each step rounded to x's dtype, as eager PyTorch rounds it
    y_i = act_i(x' W_i^T)           up to four weights W_i [N_i, D] of the same input, one output each
    y   = act(x' W_0^T) * (x' W_1^T)    (glu: two weights of one shape, one output)
    y   = residual + x' W_0^T       (residual [M, N_0])
The products accumulate in float32 and are rounded to x's dtype before the activation, as cuBLAS' are.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from lasp_hf.kernels.triton.chunk import _dot_dtype
from lasp_hf.kernels.triton.launch import fast
from lasp_hf.kernels.triton.utils import cdiv, empty, interpreting, next_pow2

ACT_IDENTITY, ACT_SILU, ACT_ELU_PLUS_ONE, ACT_SIGMOID = 0, 1, 2, 3
ACTIVATIONS = {"identity": ACT_IDENTITY, "silu": ACT_SILU, "elu_plus_one": ACT_ELU_PLUS_ONE, "sigmoid": ACT_SIGMOID}
MAX_WEIGHTS = 4
# The widest norm group taken one block at a time (a per-head output norm); wider groups must be the whole row.
MAX_NORM_GROUP = 512
NUM_WARPS, NUM_STAGES = 4, 3
# Overrides of launch_meta's tiles, e.g. {"BN": 16, "BD": 128} (benchmarks/decode_linear.py sweeps them); None: its
# own choice.
TILES: dict | None = None


@triton.jit
def _activate(y, ACT: tl.constexpr):
    """act(y) of the rounded product y, computed in float32 and rounded to y's dtype (elu + 1 rounds the elu
    first, as `F.elu(x) + 1` does)."""
    f = y.to(tl.float32)
    if ACT == 1:
        f = f / (1.0 + tl.exp(-f))
    elif ACT == 2:
        e = tl.where(f > 0, f, tl.exp(f) - 1.0).to(y.dtype).to(tl.float32)
        f = e + 1.0
    elif ACT == 3:
        f = 1.0 / (1.0 + tl.exp(-f))
    return f.to(y.dtype)


@triton.jit
def _input_block(x, gate, norm_w, rstd, o_m, m_m, d0, D, eps,
                 NORM: tl.constexpr, NORM_G: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_GATE: tl.constexpr,
                 BD: tl.constexpr):
    """The prologue of x's columns d0 .. d0 + BD: [BM, BD] in x's dtype."""
    o_d = d0 + tl.arange(0, BD)
    m_d = o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    p = o_m[:, None] * D + o_d[None, :]
    b_x = tl.load(x + p, mask=m_md, other=0.0)
    if NORM:
        f = b_x.to(tl.float32)
        if NORM_G == BD:  # a group per block (a per-head norm): its rms here
            r = 1.0 / tl.sqrt(tl.sum(f * f, 1) / NORM_G + eps)
        else:  # the whole row: from the pre-pass
            r = rstd
        b_x = (f * r[:, None]).to(b_x.dtype)
        if HAS_NORM_W:
            w = tl.load(norm_w + o_d % NORM_G, mask=m_d, other=0.0).to(tl.float32)
            b_x = (w[None, :] * b_x.to(tl.float32)).to(b_x.dtype)
    if HAS_GATE:
        u = tl.load(gate + p, mask=m_md, other=0.0).to(tl.float32)
        b_x = (u * b_x.to(tl.float32)).to(b_x.dtype)
    return b_x


@triton.jit
def _product(b_x, w, o_n, m_n, d0, D, BD: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr):
    """b_x [BM, BD] times rows o_n of W [N, D] at columns d0 .. d0 + BD, transposed: [BM, BN] in float32 (BM = 1:
    the products [BN, BD] before the sum over D)."""
    o_d = d0 + tl.arange(0, BD)
    if BM == 1:  # one row: the elementwise products, summed over D by the caller after its loop
        b_w = tl.load(w + o_n[:, None].to(tl.int64) * D + o_d[None, :], mask=m_n[:, None] & (o_d < D)[None, :],
                      other=0.0)
        out = b_w.to(tl.float32) * b_x.to(tl.float32)
    else:
        b_wt = tl.load(w + o_n[None, :].to(tl.int64) * D + o_d[:, None], mask=m_n[None, :] & (o_d < D)[:, None],
                       other=0.0)  # [BD, BN]
        if DT == tl.float32:
            out = tl.dot(b_x.to(DT), b_wt.to(DT), input_precision="ieee")
        else:
            out = tl.dot(b_x, b_wt)
    return out


@triton.jit
def decode_fwd_kernel_linear(x, gate, norm_w, residual, w0, w1, w2, w3, y0, y1, y2, y3,
                             M, D, N0, N1, N2, N3, NB0, NB1, NB2, eps,
                             NUM_W: tl.constexpr, ACT0: tl.constexpr, ACT1: tl.constexpr, ACT2: tl.constexpr,
                             ACT3: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr, NORM_G: tl.constexpr,
                             HAS_NORM_W: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
                             DT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                             PR: tl.constexpr, PC: tl.constexpr):
    """One program per BN output rows of one weight (weights in order: NB0, NB1, NB2 blocks before weights 1, 2,
    3) for all M rows of x (BM >= M)."""
    pid = tl.program_id(0)
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    rstd = tl.zeros([BM], dtype=tl.float32)
    if NORM and NORM_G != BD:  # the rms of each whole row first (x is small and stays in cache)
        ss = tl.zeros([BM], dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            f = tl.load(x + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None] & (o_d < D)[None, :],
                        other=0.0).to(tl.float32)
            ss += tl.sum(f * f, 1)
        rstd = 1.0 / tl.sqrt(ss / D + eps)

    # Which weight this program reads (uniform per program).
    w, y, N, ACT_ID, blk = w0, y0, N0, 0, pid
    if NUM_W > 1 and pid >= NB0:
        w, y, N, ACT_ID, blk = w1, y1, N1, 1, pid - NB0
        if NUM_W > 2 and pid >= NB0 + NB1:
            w, y, N, ACT_ID, blk = w2, y2, N2, 2, pid - NB0 - NB1
            if NUM_W > 3 and pid >= NB0 + NB1 + NB2:
                w, y, N, ACT_ID, blk = w3, y3, N3, 3, pid - NB0 - NB1 - NB2
    if GLU:  # both weights' rows of this block: blk counts blocks of w0
        w, y, N, ACT_ID, blk = w0, y0, N0, 0, pid
    o_n = blk * BN + tl.arange(0, BN)
    m_n = o_n < N

    # Running sums [PR, PC]: [BM, BN] products, or with one row its [BN, BD] elementwise products (partial sums
    # per lane across the loop, one reduction at its end).
    part = tl.zeros([PR, PC], dtype=tl.float32)
    part_up = tl.zeros([PR, PC], dtype=tl.float32)
    for d0 in range(0, D, BD):
        b_x = _input_block(x, gate, norm_w, rstd, o_m, m_m, d0, D, eps, NORM, NORM_G, HAS_NORM_W, HAS_GATE, BD)
        part += _product(b_x, w, o_n, m_n, d0, D, BD, BM, DT)
        if GLU:
            part_up += _product(b_x, w1, o_n, m_n, d0, D, BD, BM, DT)
    if BM == 1:
        acc, acc_up = tl.sum(part, 1)[None, :], tl.sum(part_up, 1)[None, :]
    else:
        acc, acc_up = part, part_up

    dtype = x.dtype.element_ty
    out = acc.to(dtype)
    if GLU:
        out = (_activate(out, ACT0).to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
    elif ACT_ID == 0:
        out = _activate(out, ACT0)
    elif ACT_ID == 1:
        out = _activate(out, ACT1)
    elif ACT_ID == 2:
        out = _activate(out, ACT2)
    else:
        out = _activate(out, ACT3)
    p_y = o_m[:, None] * N + o_n[None, :]
    m_y = m_m[:, None] & m_n[None, :]
    if HAS_RES:
        out = (tl.load(residual + p_y, mask=m_y, other=0.0).to(tl.float32) + out.to(tl.float32)).to(dtype)
    tl.store(y + p_y, out, mask=m_y)


_kernel = fast(decode_fwd_kernel_linear)


def launch_meta(M: int, D: int, rows, acts, glu: bool, group: int | None, dtype, *, norm: bool,
                norm_weight: bool, gate: bool, residual: bool) -> tuple[dict, tuple]:
    """(the kernel's constexprs, row blocks per weight), computed once per shape and setting (decoding calls this
    per block and step): see `_launch_meta`. The caller must not change them."""
    tiles = tuple(sorted(TILES.items())) if TILES else None
    return _launch_meta(M, D, tuple(rows), tuple(acts), glu, group, dtype, norm, norm_weight, gate, residual, tiles)


@functools.lru_cache(maxsize=256)
def _launch_meta(M, D, rows, acts, glu, group, dtype, norm, norm_weight, gate, residual, tiles):
    """BN: small enough that the programs cover every SM about twice (the product is a read of the weights); one
    row keeps BN x BD partial sums (at most 4096: about 150 registers at 4 warps on sm_90, no spills); BD = the
    norm group when the norm is per block; tiles (`TILES`) override both."""
    BM = 1 if M == 1 else max(16, next_pow2(M))
    total = rows[0] if glu else sum(rows)
    BN = 16 if BM > 1 else min(64, max(8, next_pow2(max(1, total // 256))))
    BD = group if group is not None else (min(256, 4096 // BN) if BM == 1 else 64)
    if tiles:  # the tensor-core products (several rows) take tiles of at least 16
        BN = max(dict(tiles).get("BN", BN), 16 if BM > 1 else 1)
        BD = BD if group is not None else max(dict(tiles).get("BD", BD), 16 if BM > 1 else 1)
    codes = [ACTIVATIONS[a] for a in acts] + [ACT_IDENTITY] * (MAX_WEIGHTS - len(acts))
    meta = dict(NUM_W=len(rows), ACT0=codes[0], ACT1=codes[1], ACT2=codes[2], ACT3=codes[3], GLU=glu, NORM=norm,
                NORM_G=group if group is not None else D, HAS_NORM_W=norm_weight, HAS_GATE=gate, HAS_RES=residual,
                DT=_dot_dtype(dtype), BM=BM, BN=BN, BD=BD, PR=BN if BM == 1 else BM, PC=BD if BM == 1 else BN)
    return meta, tuple(cdiv(n, BN) for n in rows)


def fused_linear(x, weights, *, acts=None, glu: bool = False, norm_eps: float | None = None, norm_weight=None,
                 norm_group: int | None = None, gate=None, residual=None):
    """The decoding step's fused projections (see the module docstring).

    Args:
        x: [M, D] (one token per row), float32 / bfloat16 / float16, contiguous.
        weights: 1 to 4 matrices [N_i, D] of x's dtype (nn.Linear weights, no bias).
        acts: an activation name per weight ("identity", "silu", "elu_plus_one", "sigmoid"); with glu, acts[0]
            is the GLU's activation of the first product.
        glu: two weights of one shape; returns act(x' W_0^T) * (x' W_1^T).
        norm_eps: normalize x by its rms (None: no norm); norm_group: features per rms (None: the whole row);
            norm_weight: [norm_group or D] after the norm, or None.
        gate: [M, D] multiplying the normed x, or None. residual: [M, N_0] added to the single output, or None.
    Returns:
        a tuple of outputs [M, N_i] in x's dtype (one with glu).
    """
    M, D = x.shape
    num_w = len(weights)
    acts = list(acts) if acts is not None else ["identity"] * num_w
    assert 1 <= num_w <= MAX_WEIGHTS and len(acts) == num_w, (num_w, acts)
    assert all(w.shape[1] == D and w.dtype == x.dtype and w.is_contiguous() for w in weights)
    assert not glu or (num_w == 2 and weights[0].shape == weights[1].shape)
    assert residual is None or (num_w == 1 or glu)
    group = None
    if norm_eps is not None and norm_group is not None and norm_group != D:
        assert D % norm_group == 0 and norm_group <= MAX_NORM_GROUP and norm_group == next_pow2(norm_group)
        group = norm_group
    rows = [w.shape[0] for w in weights]
    meta, blocks = launch_meta(M, D, rows, acts, glu, group, x.dtype, norm=norm_eps is not None,
                               norm_weight=norm_weight is not None, gate=gate is not None,
                               residual=residual is not None)
    outputs = [empty(x, (M, n), x.dtype) for n in (rows[:1] if glu else rows)]
    w_args = list(weights) + [weights[0]] * (MAX_WEIGHTS - num_w)
    y_args = outputs + [outputs[0]] * (MAX_WEIGHTS - len(outputs))
    n_args = rows + [0] * (MAX_WEIGHTS - num_w)
    nb = (list(blocks) + [0] * MAX_WEIGHTS)[:3]
    grid = (blocks[0] if glu else sum(blocks),)
    cfg = {} if interpreting() else {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}
    _kernel[grid](
        x, gate if gate is not None else x, norm_weight if norm_weight is not None else x,
        residual if residual is not None else x, *w_args, *y_args, M, D, *n_args, *nb,
        float(norm_eps if norm_eps is not None else 0.0), **meta, **cfg)
    return tuple(outputs)


__all__ = ["ACTIVATIONS", "fused_linear"]
