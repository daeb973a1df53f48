"""Float64 references for the Triton kernel tests (independent of the kernels and of
`lasp_hf.kernels.reference`, which computes in float32).

Shapes: B batch, T tokens, H heads, K key dim, V value dim, N packed sequences.
"""

from __future__ import annotations

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere in x gives inf."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def recurrence64(q, k, v, g, scale, h0=None):
    """Token by token: S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t. Differentiable.
    q, k [B, T, H, K], v [B, T, H, V], g None / [H] / [B, T, H], h0 [B, H, K, V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.double(), k.double(), v.double()
    S = h0.double() if h0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        if g is not None:
            decay = g.double().exp().view(1, H) if g.dim() == 1 else g[:, t].double().exp()
            S = S * decay[..., None, None]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, None, :] @ S).squeeze(-2))
    return torch.stack(outs, 1), S


def packed_recurrence64(q, k, v, g, scale, h0, cu_seqlens):
    """Each packed sequence on its own (B == 1); h0 [N, H, K, V] or None. Returns o, final [N, H, K, V]."""
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n in range(len(bounds) - 1):
        a, b = bounds[n], bounds[n + 1]
        g_n = g[:, a:b] if (g is not None and g.dim() == 3) else g
        h_n = h0[n:n + 1] if h0 is not None else None
        if b == a:
            H, K, V = q.shape[2], q.shape[3], v.shape[3]
            finals.append(h_n.double() if h_n is not None else q.new_zeros(1, H, K, V, dtype=torch.float64))
            continue
        o_n, s_n = recurrence64(q[:, a:b], k[:, a:b], v[:, a:b], g_n, scale, h_n)
        outs.append(o_n)
        finals.append(s_n)
    return torch.cat(outs, 1), torch.cat(finals, 0)


def chunked64(q, k, v, g, scale, h0=None, chunk: int = 256):
    """The chunked algorithm in float64 (fast enough for long T on a GPU). Differentiable."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))        # [B, H, T, D]
    if g is None:
        gg = q.new_zeros(B, H, T)
    elif g.dim() == 1:
        gg = g.double().view(1, H, 1).expand(B, H, T)
    else:
        gg = g.double().transpose(1, 2)
    S = h0.double() if h0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        L = end - start
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        b = gg[:, :, start:end].cumsum(-1)                             # [B, H, L]
        diff = (b[..., :, None] - b[..., None, :]).masked_fill(~mask[:L, :L], float("-inf"))
        o = ((qc @ kc.transpose(-1, -2)) * diff.exp()) @ vc + (qc * b.exp()[..., None]) @ S
        outs.append(scale * o)
        S = b[..., -1:, None].exp() * S + (kc * (b[..., -1:] - b).exp()[..., None]).transpose(-1, -2) @ vc
    return torch.cat(outs, 2).transpose(1, 2), S


def _cumulative_decay64(g, B, T, H, device):
    """G_t = sum_{u <= t} g_u in float64, [B, T, H] (zeros for g None)."""
    if g is None:
        return torch.zeros(B, T, H, dtype=torch.float64, device=device)
    g = g.double()
    return (g.view(1, 1, H).expand(B, T, H) if g.dim() == 1 else g).cumsum(1)


def final_state64(k, v, g, h0):
    """The state after all tokens, no output: exp(G_T) h0 + sum_t exp(G_T - G_t) k_t^T v_t, float64
    [B, H, K, V] (G_t the cumulative log-decay, inclusive). k [B, T, H, K], v [B, T, H, V], h0 or None."""
    B, T, H, _ = k.shape
    G = _cumulative_decay64(g, B, T, H, k.device)
    total = G[:, -1] if T else torch.zeros(B, H, dtype=torch.float64, device=k.device)
    state = torch.einsum("bthk,bthv,bth->bhkv", k.double(), v.double(), (total[:, None] - G).exp())
    return state + total.exp()[..., None, None] * h0.double() if h0 is not None else state


def initial_state_grad64(q, do, g, scale):
    """d sum(o * do) / d initial_state = scale * sum_t exp(G_t) q_t^T do_t, float64 [B, H, K, V]."""
    B, T, H, _ = q.shape
    G = _cumulative_decay64(g, B, T, H, q.device)
    return scale * torch.einsum("bthk,bthv,bth->bhkv", q.double(), do.double(), G.exp())
