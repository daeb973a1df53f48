"""Float64 statement of linear attention with a decay per key channel (GLA), for the tests: token by token,
independent of the chunked reference and the kernels.

Shapes: B batch, T tokens, H heads, K key dim, V value dim, N packed sequences.
"""

from __future__ import annotations

import torch


def gla_recurrence64(q, k, v, g, scale, h0=None):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, in float64. Differentiable.
    q, k, g [B, T, H, K], v [B, T, H, V], h0 [B, H, K, V] or None. Returns o [B, T, H, V], S_T."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    S = h0.double() if h0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        S = g[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, None, :] @ S).squeeze(-2))
    return torch.stack(outs, 1), S


def packed_gla_recurrence64(q, k, v, g, scale, h0, cu_seqlens):
    """Each packed sequence on its own (B == 1); h0 [N, H, K, V] or None. Returns o, final [N, H, K, V]."""
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n in range(len(bounds) - 1):
        a, b = bounds[n], bounds[n + 1]
        h_n = h0[n:n + 1] if h0 is not None else None
        if b == a:
            H, K, V = q.shape[2], q.shape[3], v.shape[3]
            finals.append(h_n.double() if h_n is not None else q.new_zeros(1, H, K, V, dtype=torch.float64))
            continue
        o_n, s_n = gla_recurrence64(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], scale, h_n)
        outs.append(o_n)
        finals.append(s_n)
    return torch.cat(outs, 1), torch.cat(finals, 0)
