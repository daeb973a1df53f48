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


def gla_chunked64(q, k, v, g, scale, h0=None, chunk: int = 32):
    """The same function in float64 a chunk at a time (fast enough for long T on a GPU). Differentiable.

    Inside a chunk, token i sees token j <= i through exp(c_i - c_j) per channel, c the cumulative g; -inf is
    replaced by -1e4 first (exp(-1e4) is exactly 0 in float64, and float64 keeps the differences of the large
    cumulative sums exact to ~1e-10), so a restart needs no special case here."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))          # [B, H, T, D]
    g = g.double().clamp(min=-1e4).transpose(1, 2)
    S = h0.double() if h0 is not None else q.new_zeros(B, H, K, V)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    outs = []
    for a in range(0, T, chunk):
        e = min(a + chunk, T)
        n = e - a
        c = g[:, :, a:e].cumsum(2)                                      # [B, H, n, K]
        diff = (c[:, :, :, None, :] - c[:, :, None, :, :]).masked_fill(~causal[:n, :n, None], float("-inf"))
        attn = torch.einsum("bhik,bhjk,bhijk->bhij", q[:, :, a:e], k[:, :, a:e], diff.exp())
        o = attn @ v[:, :, a:e] + (q[:, :, a:e] * c.exp()) @ S
        outs.append(scale * o)
        S = c[:, :, -1, :, None].exp() * S + (k[:, :, a:e] * (c[:, :, -1:] - c).exp()).transpose(-1, -2) @ v[:, :, a:e]
    return torch.cat(outs, 2).transpose(1, 2), S
