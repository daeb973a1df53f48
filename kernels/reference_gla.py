"""PyTorch reference for linear attention with a decay per key channel (gated linear attention, GLA / HGRN2).

Shapes: B batch, T tokens, H heads, K key/query head dim, V value head dim, C chunk length, N chunks.

Per batch row and head, with S_0 the initial state (zeros if None) and g_t in R^K (natural-log, <= 0):
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        (S_t is K x V, float32)
    o_t = scale * q_t S_t
A channel whose g_t is -inf restarts: S_t[c] = k_t[c] v_t.

Chunked form (b the cumulative log-decay inside a chunk, per channel):
    o_i   = scale * ( sum_{j<=i} (sum_c q_ic k_jc exp(b_ic - b_jc)) v_j  +  (q_i * exp(b_i)) S_prev )
    S_new = diag(exp(b_C)) S_prev + sum_j (k_j * exp(b_C - b_j))^T v_j
Every exponent above is <= 0 (the intra-chunk pairs are formed elementwise, C x C x K, never as
exp(b_i) * exp(-b_j)), so no decay overflows. -inf is exact: b sums only the finite entries and a
per-channel count of restarts zeroes every factor whose interval contains a restart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lasp_hf.kernels.host import host_bounds

# Small chunks: the intra-chunk tensor is C x C x K per chunk.
CHUNK_SIZE = 16


def _chunk_decays(g: torch.Tensor):
    """g [..., C, K] -> (b, restarts): the cumulative sum of its finite entries and the cumulative count of
    -inf entries along C, both float32."""
    g = g.float()
    reset = torch.isneginf(g)
    return torch.where(reset, 0.0, g).cumsum(-2), reset.float().cumsum(-2)


def _masked_exp(diff: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(diff) where keep, else 0 (diff clamped at 0 first: the dropped entries may be positive)."""
    return torch.where(keep, diff.clamp(max=0.0).exp(), 0.0)


def chunk_gla_dense(q, k, v, g, scale: float, initial_state, output_final_state: bool, chunk_size: int = CHUNK_SIZE):
    """Chunked linear attention with g [B, T, H, K] over full sequences. See the module docstring.

    Returns o [B, T, H, V] in v's dtype and the float32 final state [B, H, K, V] (or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = (T + C - 1) // C
    pad = N * C - T
    # [B, H, T, D] in float32; padded tokens have k = v = 0 and g = 0, so they change nothing.
    qf, kf, vf, gf = (x.float().transpose(1, 2) for x in (q, k, v, g))
    if pad:
        qf, kf, vf, gf = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf, gf))
    qc, kc, gc = (x.reshape(B, H, N, C, K) for x in (qf, kf, gf))
    vc = vf.reshape(B, H, N, C, V)
    b, restarts = _chunk_decays(gc)                                        # [B, H, N, C, K]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j, c] = exp(b_ic - b_jc) for j <= i with no restart of channel c in (j, i].
    same = restarts.unsqueeze(-2) == restarts.unsqueeze(-3)                 # [B, H, N, C, C, K]
    decay = _masked_exp(b.unsqueeze(-2) - b.unsqueeze(-3), same & causal[..., None])
    attn = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, decay)
    o = attn @ vc                                                           # [B, H, N, C, V]

    b_last, r_last = b[..., -1:, :], restarts[..., -1:, :]
    k_to_end = kc * _masked_exp(b_last - b, restarts == r_last)
    chunk_states = k_to_end.transpose(-1, -2) @ vc                          # [B, H, N, K, V]
    chunk_decay = _masked_exp(b_last, r_last == 0).squeeze(-2)              # [B, H, N, K]
    q_from_start = qc * _masked_exp(b, restarts == 0)

    state = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    states_before = []
    for n in range(N):
        states_before.append(state)
        state = chunk_decay[:, :, n, :, None] * state + chunk_states[:, :, n]
    o = o + q_from_start @ torch.stack(states_before, dim=2)
    o = (scale * o).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(v.dtype), (state if output_final_state else None)


def chunk_linear_attention(q, k, v, g, *, scale: float, initial_state=None, output_final_state=False,
                           cu_seqlens=None, chunk_size: int = CHUNK_SIZE):
    """Reference backend of `lasp_hf.linear_attention` for g [B, T, H, K] (inputs already validated).

    With cu_seqlens (int [N + 1], B == 1) each packed sequence runs on its own; initial_state / final_state
    are then [N, H, K, V].
    """
    if cu_seqlens is None:
        return chunk_gla_dense(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
    bounds = host_bounds(cu_seqlens)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    outs, finals = [], []
    for n in range(len(bounds) - 1):
        start, end = bounds[n], bounds[n + 1]
        h0 = None if initial_state is None else initial_state[n:n + 1]
        if end == start:
            # An empty sequence passes its initial state through unchanged.
            finals.append(h0.float() if h0 is not None else q.new_zeros(1, H, K, V, dtype=torch.float32))
            continue
        o_n, s_n = chunk_gla_dense(q[:, start:end], k[:, start:end], v[:, start:end], g[:, start:end], scale, h0,
                                   output_final_state, chunk_size)
        outs.append(o_n)
        finals.append(s_n)
    o = torch.cat(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


def recurrent_step(q, k, v, g, *, scale: float, state=None, inplace: bool = False):
    """One decoding step with g [B, H, K]: S = diag(exp(g)) S + k^T v, o = scale * q S.

    Returns o [B, H, V] in v's dtype and the new float32 state [B, H, K, V] (written into `state` if inplace).
    """
    given = state
    B, H, K = q.shape
    V = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, H, K, V, dtype=torch.float32)
    state = g.float().exp().unsqueeze(-1) * state.float() + k.float().unsqueeze(-1) * v.float().unsqueeze(-2)
    o = scale * (q.float().unsqueeze(-2) @ state).squeeze(-2)
    return o.to(v.dtype), given.copy_(state) if inplace else state
