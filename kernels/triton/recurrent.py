"""Fused one-token decoding step of linear attention with decay (inference only, no autograd).

Shapes: B batch, H heads, K key/query head dim, V value head dim.
    S_new = exp(g) * S + k^T v,    o = scale * q S_new     (g per head, or diag(exp(g)) per key channel)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lasp_hf.kernels.triton.launch import fast
from lasp_hf.kernels.triton.utils import cdiv, empty, interpreting, next_pow2

G_NONE, G_HEAD, G_BATCH_HEAD, G_CHANNEL = 0, 1, 2, 3
# Programs a step launches at least, where V allows (an H100 has 132 SMs; each program reads K x BV of state).
MIN_PROGRAMS = 256


@fast
@triton.jit
def _recurrent_step_kernel(q, k, v, g, state, new_state, o, scale,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, G_MODE: tl.constexpr,
                           HAS_STATE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One program per (batch row, head, V block); the whole K axis of the state is in the program."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    if HAS_STATE:
        s = tl.load(state + p_state, mask=m_kv, other=0.0).to(tl.float32)
        if G_MODE == 1:
            s = s * tl.exp(tl.load(g + i_h).to(tl.float32))
        elif G_MODE == 2:
            s = s * tl.exp(tl.load(g + i_bh).to(tl.float32))
        elif G_MODE == 3:  # a decay per key channel (GLA): g [B, H, K]
            s = s * tl.exp(tl.load(g + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32))[:, None]
        s += b_k[:, None] * b_v[None, :]
    else:
        s = b_k[:, None] * b_v[None, :]
    tl.store(new_state + p_state, s, mask=m_kv)
    b_o = tl.sum(b_q[:, None] * s, 0) * scale
    tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def recurrent_step(q, k, v, g=None, *, scale: float, state=None, inplace: bool = False):
    """One decoding step (inputs already validated by `lasp_hf.ops`).

    Args:
        q, k: [B, H, K]; v: [B, H, V]; g: None, [H], [B, H] or [B, H, K] (per key channel) natural-log decay;
        state: None or float32 [B, H, K, V], the state after the previous token.
        inplace: write the new state into `state` (float32, contiguous): each program reads its state tile
            whole before it writes the same tile, so no program reads what another wrote.
    Returns:
        o [B, H, V] in v's dtype and the new float32 state [B, H, K, V].
    """
    B, H, K = q.shape
    V = v.shape[-1]
    BK = max(16, next_pow2(K))
    BV = min(max(16, next_pow2(V)), max(16, 8192 // BK))
    # Few rows and heads (decoding at B = 1): narrower V blocks, so that enough programs share the state's read.
    while BV > 16 and B * H * cdiv(V, BV) < MIN_PROGRAMS:
        BV //= 2
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g_mode = G_NONE if g is None else (G_HEAD, G_BATCH_HEAD, G_CHANNEL)[g.dim() - 1]
    state_in = state.float().contiguous() if state is not None else None
    new_state = state_in if inplace else empty(q, (B, H, K, V), torch.float32)
    o = empty(v, v.shape, v.dtype)
    cfg = {} if interpreting() else {"num_warps": 4}
    _recurrent_step_kernel[(B * H, cdiv(V, BV))](
        q, k, v, g.contiguous() if g is not None else q, state_in if state_in is not None else new_state,
        new_state, o, scale, H=H, K=K, V=V, G_MODE=g_mode, HAS_STATE=state is not None, BK=BK, BV=BV, **cfg)
    return o, new_state
