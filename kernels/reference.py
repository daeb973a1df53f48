"""PyTorch reference for linear attention with decay: the chunked form and the one-token step.

Shapes (legend used in every file of this package):
    B batch, T tokens, H heads, K key/query head dim, V value head dim, C chunk length,
    N number of chunks (or of packed sequences, where said).

Per batch row and head, with S_0 the initial state (zeros if None):
    S_t = exp(g_t) * S_{t-1} + k_t^T v_t        (S_t is K x V, float32)
    o_t = scale * q_t S_t
The chunked form computes the same thing block by block (C tokens at a time), with b the
cumulative log-decay inside a chunk:
    o_i   = scale * ( sum_{j<=i} (q_i . k_j) exp(b_i - b_j) v_j  +  exp(b_i) q_i S_prev )
    S_new = exp(b_C) S_prev + sum_j exp(b_C - b_j) k_j^T v_j
It runs on any device through autograd (gradients to q, k, v, g and the initial state) and is
the fallback wherever the Triton kernels cannot run.

g = -inf (a decay to exactly zero) restarts the state: S_t = k_t^T v_t. Inside b it counts as 0 and
every factor exp(b_i - b_j), exp(b_i), exp(b_C - b_j), exp(b_C) that spans a restart is masked to 0
instead, so no inf - inf (NaN) ever forms and the finite decays keep their accuracy; the gradient of g
at a restart is exactly 0, as exp(g) = 0 makes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lasp_hf.kernels.host import host_bounds

CHUNK_SIZE = 64


def _expand_decay(g: torch.Tensor | None, B: int, T: int, H: int, device) -> torch.Tensor:
    """g as a float32 [B, T, H] tensor (None -> zeros, [H] -> broadcast over B and T)."""
    if g is None:
        return torch.zeros(B, T, H, device=device, dtype=torch.float32)
    if g.dim() == 1:
        return g.float().view(1, 1, H).expand(B, T, H)
    return g.float()


def _split_restarts(gf: torch.Tensor):
    """(g with -inf replaced by 0, the boolean restart mask): see the module docstring."""
    restart = torch.isneginf(gf)
    return gf.masked_fill(restart, 0.0), restart


def chunk_linear_attention_dense(q, k, v, g, scale: float, initial_state, output_final_state: bool,
                                 chunk_size: int = CHUNK_SIZE):
    """Chunked linear attention over full (unpacked) sequences. See the module docstring.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: None, [H] or [B, T, H]; initial_state: None or
    [B, H, K, V]. Returns o [B, T, H, V] in v's dtype and the float32 final state [B, H, K, V]
    (or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = (T + C - 1) // C
    pad = N * C - T
    gf, restart = _split_restarts(_expand_decay(g, B, T, H, q.device))
    # [B, H, T, D] in float32; padded tokens have k = v = 0 and g = 0, so they change nothing.
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    gf, restart = gf.transpose(1, 2), restart.transpose(1, 2)
    if pad:
        qf, kf, vf = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf))
        gf = F.pad(gf, (0, pad))
        restart = F.pad(restart, (0, pad))
    qc = qf.reshape(B, H, N, C, K)
    kc = kf.reshape(B, H, N, C, K)
    vc = vf.reshape(B, H, N, C, V)
    b = gf.reshape(B, H, N, C).cumsum(-1)                        # [B, H, N, C]
    r = restart.reshape(B, H, N, C).cumsum(-1)                   # restarts up to each token of its chunk
    r_last = r[..., -1:]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp(b_i - b_j) only where i >= j with no restart in (j, i]: the difference is <= 0 there, so it never
    # overflows.
    visible = causal & (r.unsqueeze(-1) == r.unsqueeze(-2))
    diff = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~visible, float("-inf"))
    attn = (qc @ kc.transpose(-1, -2)) * diff.exp()               # [B, H, N, C, C]
    o = attn @ vc                                                 # [B, H, N, C, V]

    b_last = b[..., -1:]                                          # [B, H, N, 1]
    reaches_end = (r == r_last).float()
    chunk_states = (kc * ((b_last - b).exp() * reaches_end).unsqueeze(-1)).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    chunk_decay = b_last.squeeze(-1).exp() * (r_last.squeeze(-1) == 0).float()  # [B, H, N]

    if initial_state is None:
        state = q.new_zeros(B, H, K, V, dtype=torch.float32)
    else:
        state = initial_state.float()
    states_before = []
    for n in range(N):
        states_before.append(state)
        state = chunk_decay[:, :, n, None, None] * state + chunk_states[:, :, n]
    prev = torch.stack(states_before, dim=2)                      # [B, H, N, K, V]
    o = o + (qc * (b.exp() * (r == 0).float()).unsqueeze(-1)) @ prev
    o = (scale * o).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(v.dtype), (state if output_final_state else None)


def chunk_linear_attention_packed(q, k, v, g, scale: float, cu_seqlens, chunk_size: int = CHUNK_SIZE):
    """Packed sequences from zero states, no final states, in one chunked pass (the training case).

    The dense algorithm with document masks: inside a chunk a token attends only to its own
    document; the state entering a chunk reaches only tokens of the document it belongs to, and
    leaves the chunk only if no document starts inside it.
    """
    _, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = (T + C - 1) // C
    pad = N * C - T
    tokens = torch.arange(T, device=q.device)
    doc = torch.bucketize(tokens, cu_seqlens[1:].to(device=q.device, dtype=torch.long), right=True)
    gf, restart = _split_restarts(_expand_decay(g, 1, T, H, q.device)[0].transpose(0, 1))  # [H, T]
    qf, kf, vf = (x[0].float().transpose(0, 1) for x in (q, k, v))         # [H, T, D]
    if pad:
        qf, kf, vf = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf))
        gf = F.pad(gf, (0, pad))
        restart = F.pad(restart, (0, pad))
        doc = F.pad(doc, (0, pad), value=-1)
    qc, kc, vc = qf.reshape(H, N, C, K), kf.reshape(H, N, C, K), vf.reshape(H, N, C, V)
    b = gf.reshape(H, N, C).cumsum(-1)
    r = restart.reshape(H, N, C).cumsum(-1)                                # restarts (g = -inf) so far in the chunk
    r_last = r[..., -1:]
    dc = doc.reshape(N, C)
    prev_doc = torch.cat([dc.new_full((1,), -2), dc[:-1, -1]])             # document entering each chunk
    last_doc = dc[:, -1]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    visible = causal & (dc[:, :, None] == dc[:, None, :]) & (r.unsqueeze(-1) == r.unsqueeze(-2))  # [H, N, C, C]
    diff = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~visible, float("-inf"))
    o = ((qc @ kc.transpose(-1, -2)) * diff.exp()) @ vc                    # [H, N, C, V]

    carried_in = ((dc == prev_doc[:, None]) & (r == 0)).float()            # [H, N, C]
    carried_out = ((dc == last_doc[:, None]) & (r == r_last)).float()
    b_last = b[..., -1:]
    chunk_states = (kc * ((b_last - b).exp() * carried_out).unsqueeze(-1)).transpose(-1, -2) @ vc
    chunk_decay = b_last.squeeze(-1).exp() * ((last_doc == prev_doc) & (r_last.squeeze(-1) == 0)).float()  # [H, N]
    state = q.new_zeros(H, K, V, dtype=torch.float32)
    states_before = []
    for n in range(N):
        states_before.append(state)
        state = chunk_decay[:, n, None, None] * state + chunk_states[:, n]
    prev = torch.stack(states_before, dim=1)                                # [H, N, K, V]
    o = o + (qc * (b.exp() * carried_in).unsqueeze(-1)) @ prev
    o = (scale * o).reshape(H, N * C, V)[:, :T].transpose(0, 1)
    return o.unsqueeze(0).to(v.dtype)


def chunk_linear_attention(q, k, v, g=None, *, scale: float, initial_state=None, output_final_state=False,
                           cu_seqlens=None, chunk_size: int = CHUNK_SIZE):
    """Reference backend of `lasp_hf.linear_attention` (inputs already validated).

    With cu_seqlens (int [N+1], B == 1) the state resets at each boundary, and initial_state /
    final_state are [N, H, K, V]. Without per-document states that is one masked chunked pass;
    with them, each packed sequence runs on its own.
    """
    if cu_seqlens is None:
        return chunk_linear_attention_dense(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
    if initial_state is None and not output_final_state:
        return chunk_linear_attention_packed(q, k, v, g, scale, cu_seqlens, chunk_size), None
    bounds = host_bounds(cu_seqlens)
    outs, finals = [], []
    for n in range(len(bounds) - 1):
        start, end = bounds[n], bounds[n + 1]
        g_n = g[:, start:end] if (g is not None and g.dim() == 3) else g
        h0 = None if initial_state is None else initial_state[n:n + 1]
        if end == start:
            # An empty sequence passes its initial state through unchanged.
            if output_final_state:
                H, K, V = q.shape[2], q.shape[3], v.shape[3]
                finals.append(h0.float() if h0 is not None else q.new_zeros(1, H, K, V, dtype=torch.float32))
            continue
        o_n, s_n = chunk_linear_attention_dense(
            q[:, start:end], k[:, start:end], v[:, start:end], g_n, scale, h0, output_final_state, chunk_size
        )
        outs.append(o_n)
        finals.append(s_n)
    o = torch.cat(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


def recurrent_step(q, k, v, g=None, *, scale: float, state=None, inplace: bool = False):
    """One decoding step of the recurrence.

    q, k: [B, H, K]; v: [B, H, V]; g: None, [H] or [B, H]; state: None or [B, H, K, V] (float32).
    Returns o [B, H, V] in v's dtype and the new float32 state [B, H, K, V] (written into `state` if inplace).
    """
    given = state
    B, H, K = q.shape
    V = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, H, K, V, dtype=torch.float32)
    state = state.float()
    if g is not None:
        decay = g.float().exp()
        decay = decay.view(1, H, 1, 1) if decay.dim() == 1 else decay.view(B, H, 1, 1)
        state = decay * state
    state = state + k.float().unsqueeze(-1) * v.float().unsqueeze(-2)
    o = scale * (q.float().unsqueeze(-2) @ state).squeeze(-2)
    return o.to(v.dtype), given.copy_(state) if inplace else state
