"""The op's PyTorch backend against a float64 step-by-step recurrence written here.

Shapes: B batch, T tokens, H heads, K key dim, V value dim.
"""

import pytest
import torch

from lasp_hf import linear_attention, linear_attention_step


def recurrence(q, k, v, g, scale, h0=None):
    """float64 S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t; g None/[H]/[B,T,H]."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = torch.zeros(B, H, K, V, dtype=torch.float64) if h0 is None else h0.double().clone()
    outs = []
    for t in range(T):
        if g is not None:
            gt = g.double().view(1, H) if g.dim() == 1 else g[:, t].double()
            S = gt.exp()[..., None, None] * S
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, None, :] @ S).squeeze(-2))
    return torch.stack(outs, dim=1), S


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, K, V, g_mode, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen).to(dtype)
    k = torch.randn(B, T, H, K, generator=gen).to(dtype)
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    if g_mode == "none":
        g = None
    elif g_mode == "head":
        g = -torch.rand(H, generator=gen) * 0.5 - 0.01
    else:
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 2.0)
    return q, k, v, g


@pytest.mark.parametrize("T", [1, 63, 65, 1000])
@pytest.mark.parametrize("g_mode", ["none", "head", "token"])
def test_forward_matches_recurrence(T, g_mode):
    B, H, K, V = 2, 2, 16, 8
    q, k, v, g = make_inputs(B, T, H, K, V, g_mode)
    h0 = torch.randn(B, H, K, V)
    o, s = linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch")
    o_ref, s_ref = recurrence(q, k, v, g, K ** -0.5, h0)
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32
    assert s.shape == (B, H, K, V) and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("g_mode", ["none", "head", "token"])
def test_gradients_match_recurrence(g_mode):
    B, T, H, K, V = 2, 70, 2, 8, 16
    q, k, v, g = make_inputs(B, T, H, K, V, g_mode, seed=1)
    h0 = torch.randn(B, H, K, V)
    leaves = [q, k, v, h0] + ([g] if g is not None else [])
    do = torch.randn(B, T, H, V)
    ds = torch.randn(B, H, K, V)

    def grads(fn, cast):
        xs = [x.detach().to(cast).requires_grad_(True) for x in leaves]
        gg = xs[4] if g is not None else None
        o, s = fn(xs[0], xs[1], xs[2], gg, xs[3])
        ((o * do.to(cast)).sum() + (s * ds.to(cast)).sum()).backward()
        return [x.grad for x in xs]

    ours = grads(lambda q_, k_, v_, g_, h_: linear_attention(
        q_, k_, v_, g_, scale=0.3, initial_state=h_, output_final_state=True, backend="torch"), torch.float32)
    ref = grads(lambda q_, k_, v_, g_, h_: recurrence(q_, k_, v_, g_, 0.3, h_), torch.float64)
    names = ["dq", "dk", "dv", "dh0", "dg"]
    for name, a, b in zip(names, ours, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


@pytest.mark.parametrize("g_mode", ["none", "head", "token"])
def test_packed_matches_per_sequence_loop(g_mode):
    H, K, V = 2, 8, 8
    lengths = [5, 64, 1, 130, 37]
    T = sum(lengths)
    q, k, v, g = make_inputs(1, T, H, K, V, g_mode, seed=2)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    h0 = torch.randn(len(lengths), H, K, V)
    o, s = linear_attention(q, k, v, g, cu_seqlens=cu, initial_state=h0, output_final_state=True, backend="torch")
    assert s.shape == (len(lengths), H, K, V)
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        g_n = g[:, a:b] if (g is not None and g.dim() == 3) else g
        o_ref, s_ref = recurrence(q[:, a:b], k[:, a:b], v[:, a:b], g_n, K ** -0.5, h0[n:n + 1])
        assert rel_err(o[:, a:b], o_ref) < 1e-5
        assert rel_err(s[n:n + 1], s_ref) < 1e-5


def test_bf16_inputs_within_tolerance():
    B, T, H, K, V = 1, 300, 2, 32, 32
    q, k, v, g = make_inputs(B, T, H, K, V, "head", dtype=torch.bfloat16, seed=3)
    o, s = linear_attention(q, k, v, g, output_final_state=True, backend="torch")
    o_ref, s_ref = recurrence(q, k, v, g, K ** -0.5)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-2
    assert rel_err(s, s_ref) < 1e-4  # the state is float32 from bf16-exact inputs


@pytest.mark.parametrize("g_mode", ["none", "head", "token"])
def test_step_matches_full_sequence(g_mode):
    B, T, H, K, V = 3, 9, 2, 8, 4
    q, k, v, g = make_inputs(B, T, H, K, V, g_mode, seed=4)
    o_ref, s_ref = recurrence(q, k, v, g, 0.5)
    state = None
    for t in range(T):
        g_t = g if (g is None or g.dim() == 1) else g[:, t]
        o_t, state = linear_attention_step(q[:, t], k[:, t], v[:, t], g_t, state=state, scale=0.5, backend="torch")
        assert rel_err(o_t, o_ref[:, t]) < 1e-5
    assert rel_err(state, s_ref) < 1e-5


def test_default_scale_is_inverse_sqrt_k():
    q, k, v, g = make_inputs(1, 20, 1, 16, 4, "none", seed=5)
    o, _ = linear_attention(q, k, v, backend="torch")
    assert rel_err(o, recurrence(q, k, v, None, 0.25)[0]) < 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=torch.randn(2, 8, 2)), "4-D"),
        (dict(k=torch.randn(1, 8, 2, 5)), "same shape"),
        (dict(v=torch.randn(1, 7, 2, 4)), "v must be"),
        (dict(q=torch.randn(1, 8, 2, 4, dtype=torch.float64)), "float32, bfloat16"),
        (dict(g=torch.zeros(3)), "g must be"),
        (dict(g=torch.zeros(1, 8, 3)), "g must be"),
        (dict(initial_state=torch.zeros(1, 2, 4, 3)), "initial_state"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "end at T"),
        (dict(cu_seqlens=torch.tensor([0.0, 8.0])), "integer"),
        (dict(backend="cuda"), "backend"),
        (dict(sp_mode="tree"), "sp_mode"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    args = dict(q=torch.randn(1, 8, 2, 4), k=torch.randn(1, 8, 2, 4), v=torch.randn(1, 8, 2, 4), g=None)
    args.update({name: kwargs.pop(name) for name in list(kwargs) if name in args})
    with pytest.raises(ValueError, match=match):
        linear_attention(args["q"], args["k"], args["v"], args["g"], **kwargs)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 1, 4)
    with pytest.raises(ValueError, match="CUDA"):
        linear_attention(q, q, q, backend="triton")


def test_triton_backend_rejects_head_dims_it_cannot_tile(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 4, 1, 16)
    v = torch.randn(1, 4, 1, 6)
    with pytest.raises(ValueError, match="multiples of 16"):
        linear_attention(q, q, v, backend="triton")


@pytest.mark.parametrize("g_mode", ["none", "head", "token"])
def test_packed_training_path_matches_recurrence(g_mode):
    """Zero states and no final state take the one-pass masked path: outputs and every gradient."""
    H, K, V = 2, 8, 4
    lengths = [3, 0, 64, 1, 70, 64, 20]  # an empty document, chunk-aligned starts, starts inside chunks
    T = sum(lengths)
    q, k, v, g = make_inputs(1, T, H, K, V, g_mode, seed=6)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)] + ([g.clone().requires_grad_(True)] if g is not None else [])
    o, final = linear_attention(*leaves[:3], leaves[3] if g is not None else None, cu_seqlens=cu, backend="torch")
    assert final is None
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    outs = []
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        if a == b:
            continue
        g_n = None if g is None else (ref_leaves[3] if g.dim() == 1 else ref_leaves[3][:, a:b])
        outs.append(recurrence(*(x[:, a:b] for x in ref_leaves[:3]), g_n, K ** -0.5)[0])
    o_ref = torch.cat(outs, dim=1)
    grads_ref = torch.autograd.grad((o_ref * do.double()).sum(), ref_leaves)
    assert rel_err(o, o_ref) < 1e-5
    for name, a, b in zip(["dq", "dk", "dv", "dg"], grads, grads_ref):
        # dg sums over every token with cancellation: the float32 bound (1e-4) applies there.
        assert rel_err(a, b) < (1e-4 if name == "dg" else 1e-5), name
