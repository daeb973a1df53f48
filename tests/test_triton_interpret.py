"""The Triton kernels on CPU tensors, in Triton's interpreter (TRITON_INTERPRET=1), against a float64
recurrence: output, final state and every gradient, at tiny shapes.

TRITON_INTERPRET must be set before triton itself is imported (its own library functions are decorated
then), which another test module of the same pytest process may already have done. So unless this
process was started with it, one test runs this file again in a subprocess that has it, and the
kernel tests here are skipped.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import lasp_hf
from interpreter_harness import needs_interpreter, outside_interpreter, run_in_interpreter_subprocess
from triton_reference64 import final_state64, initial_state_grad64, packed_recurrence64, recurrence64, rel_err


# float32 through the interpreter is numpy float32: ~1e-6; the project's float32 bound is 1e-4.
TOL_FP32 = 1e-4
TOL_BF16 = 1e-2


@outside_interpreter
def test_in_interpreter_subprocess():
    run_in_interpreter_subprocess(__file__)


@pytest.fixture
def kernels():
    from lasp_hf.kernels.triton import chunk, utils

    utils.POISON_OUTPUTS = True
    yield chunk
    utils.POISON_OUTPUTS = False
    chunk.CHUNKS_PER_SEGMENT = None


def _decay(mode, B, T, H, dtype=torch.float32):
    if mode == "none":
        return None
    if mode == "head":
        return (-0.2 * torch.rand(H, dtype=dtype)).requires_grad_()
    return (-0.2 * torch.rand(B, T, H, dtype=dtype)).requires_grad_()


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() if x is not None else None for x in xs]


def _check(kernels, B, T, H, K, V, g_mode, *, dtype=torch.float32, use_h0=True, use_final=True, cps=None,
           cu_seqlens=None, g_grad=True, tol=TOL_FP32):
    kernels.CHUNKS_PER_SEGMENT = cps
    q, k, v = (torch.randn(B, T, H, D, dtype=dtype) for D in (K, K, V))
    g = _decay(g_mode, B, T, H)
    if g is not None and not g_grad:
        g = g.detach()
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    h0 = torch.randn(N, H, K, V) if use_h0 else None
    scale = K ** -0.5
    q, k, v, g_k, h0_k = _leaves(q, k, v, g, h0)
    if g_k is not None and not g_grad:
        g_k.requires_grad_(False)
    o, final = lasp_hf.linear_attention(q, k, v, g_k, scale=scale, initial_state=h0_k, output_final_state=use_final,
                                        cu_seqlens=cu_seqlens, backend="triton")
    assert o.dtype == v.dtype and o.shape == (B, T, H, V)
    do = torch.randn(B, T, H, V, dtype=torch.float64)
    dS = torch.randn(N, H, K, V, dtype=torch.float64)
    loss = (o.double() * do).sum() + ((final.double() * dS).sum() if use_final else 0)
    loss.backward()

    q64, k64, v64, g64, h064 = _leaves(*(x.double() if x is not None else None for x in (q, k, v, g, h0)))
    if g64 is not None and not g_grad:
        g64.requires_grad_(False)
    if cu_seqlens is None:
        o_ref, s_ref = recurrence64(q64, k64, v64, g64, scale, h064)
    else:
        o_ref, s_ref = packed_recurrence64(q64, k64, v64, g64, scale, h064, cu_seqlens)
    ((o_ref * do).sum() + ((s_ref * dS).sum() if use_final else 0)).backward()

    errors = {"o": rel_err(o, o_ref)}
    if use_final:
        assert final.dtype == torch.float32
        errors["final_state"] = rel_err(final, s_ref)
    else:
        assert final is None
    pairs = [("dq", q, q64), ("dk", k, k64), ("dv", v, v64)]
    if use_h0:
        pairs.append(("dh0", h0_k, h064))
    if g is not None and g_grad:
        pairs.append(("dg", g_k, g64))
    for name, x, x64 in pairs:
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype, name
        errors[name] = rel_err(x.grad, x64.grad)
    if g is not None and not g_grad:
        assert g_k.grad is None
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errors})"


@needs_interpreter
@pytest.mark.parametrize("g_mode", ["none", "head", "token"])
@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_forward_backward(kernels, T, g_mode):
    # Longer sequences are cut into one-chunk segments, so the segment state/combine kernels run too.
    _check(kernels, 2, T, 2, 16, 32, g_mode, cps=1 if T > 64 else None)


@needs_interpreter
@pytest.mark.parametrize("cps", [None, 2])
def test_segments_of_several_chunks(kernels, cps):
    # 3 chunks: one segment per sequence (no state pass), or segments of 2 + 1 chunks.
    _check(kernels, 1, 130, 2, 32, 16, "token", cps=cps)


@needs_interpreter
@pytest.mark.parametrize("g_mode", ["head", "token"])
@pytest.mark.parametrize("cps", [None, 1])
def test_packed_sequences(kernels, g_mode, cps):
    # An empty sequence, a one-token sequence, and sequences that end mid-chunk and on a chunk boundary.
    cu_seqlens = torch.tensor([0, 0, 1, 66, 130, 200], dtype=torch.int32)
    _check(kernels, 1, 200, 2, 16, 16, g_mode, cps=cps, cu_seqlens=cu_seqlens)


@needs_interpreter
def test_without_states_and_constant_decay(kernels):
    _check(kernels, 2, 65, 2, 16, 16, "head", use_h0=False, use_final=False, g_grad=False)


@needs_interpreter
@pytest.mark.parametrize("g_mode", ["none", "token"])
def test_local_backward_takes_dfinal_after_dq(kernels, monkeypatch, g_mode):
    """`local_backward` with the final state's gradient given late (a function, as sequence parallelism passes it
    while the state is still being received): asked for once, after dq's kernel is queued and before the kernels
    that need it; every gradient against the float64 recurrence."""
    B, T, H, K, V = 2, 130, 2, 16, 16
    kernels.CHUNKS_PER_SEGMENT = 1
    events = []

    def recorded(name):
        kernel = getattr(kernels, name)

        class Launch:
            def __getitem__(self, grid):
                events.append(name)
                return kernel[grid]
        return Launch()

    for name in ("_bwd_kernel_dq", "_bwd_kernel_dk", "_bwd_kernel_dv", "_kernel_segment_scan"):
        monkeypatch.setattr(kernels, name, recorded(name))
    q, k, v = (torch.randn(B, T, H, D) for D in (K, K, V))
    g = _decay(g_mode, B, T, H)
    g = g.detach() if g is not None else None
    scale = K ** -0.5
    o, final, saved, info = kernels.local_forward(q, k, v, g, scale=scale, need_final=True, need_dg=g is not None)
    do, dS = torch.randn(B, T, H, V), torch.randn(B, H, K, V)

    def late():
        events.append("dfinal")
        return dS

    events.clear()
    dq, dk, dv, dg, _ = kernels.local_backward(saved, info, do, late)
    assert events.count("dfinal") == 1
    assert events.index("_bwd_kernel_dq") < events.index("dfinal") < events.index("_bwd_kernel_dv"), events
    assert events.index("dfinal") < events.index("_bwd_kernel_dk"), events

    q64, k64, v64, g64 = _leaves(*(x.double() if x is not None else None for x in (q, k, v, g)))
    o_ref, s_ref = recurrence64(q64, k64, v64, g64, scale)
    ((o_ref * do.double()).sum() + (s_ref * dS.double()).sum()).backward()
    pairs = [("o", o, o_ref), ("final", final, s_ref), ("dq", dq, q64.grad), ("dk", dk, k64.grad),
             ("dv", dv, v64.grad)] + ([("dg", dg, g64.grad)] if g is not None else [])
    errors = {name: rel_err(got, ref.detach()) for name, got, ref in pairs}
    assert all(err <= TOL_FP32 for err in errors.values()), errors


@needs_interpreter
def test_dims_not_powers_of_two(kernels):
    _check(kernels, 1, 65, 2, 48, 80, "head", cps=1)


@needs_interpreter
@pytest.mark.parametrize("K, V", [(32, 32), (48, 80)])
def test_several_blocks(kernels, monkeypatch, K, V):
    # Small state tiles: the forward and dv kernels split V, the dk and dq kernels split K, and the
    # per-block shares of the decay gradient are summed.
    monkeypatch.setitem(kernels.CONFIGS, "fwd", (256, 4, 2))
    monkeypatch.setitem(kernels.CONFIGS, "fwd_state", (256, 4, 2))
    monkeypatch.setitem(kernels.CONFIGS, "scan", (64, 4, 1))
    monkeypatch.setitem(kernels.CONFIGS, "bwd", (256, 4, 2))
    _check(kernels, 1, 130, 2, K, V, "token", cps=1)


@needs_interpreter
def test_forward_steps_with_their_own_tiles(kernels, monkeypatch):
    # The forward's step 1 (segment states) splits V into blocks while step 3 holds all of it; the walks over
    # segments (step 2 both ways) take the state in blocks of 128 elements.
    monkeypatch.setitem(kernels.CONFIGS, "fwd_state", (256, 4, 2))
    monkeypatch.setitem(kernels.CONFIGS, "scan", (128, 4, 1))
    _check(kernels, 1, 130, 2, 32, 48, "token", cps=1)


@needs_interpreter
@pytest.mark.parametrize("g_mode", ["none", "head", "token"])
def test_forward_in_steps_of_128_tokens(kernels, monkeypatch, g_mode):
    # The forward's kernels take 128 tokens per step for 16-bit inputs (the default settings); segments of an
    # odd number of 64-token chunks end in the middle of a step.
    monkeypatch.setitem(kernels.CONFIGS, "fwd_state", (16384, 8, 2, 128))
    monkeypatch.setitem(kernels.CONFIGS, "fwd", (16384, 8, 2, 128))
    assert kernels._step_tokens("fwd", torch.bfloat16, 32) == 128
    _check(kernels, 1, 330, 2, 32, 32, g_mode, dtype=torch.bfloat16, cps=3, tol=TOL_BF16)


@needs_interpreter
def test_bfloat16_inputs(kernels):
    _check(kernels, 1, 65, 2, 32, 32, "token", dtype=torch.bfloat16, cps=1, tol=TOL_BF16)


@needs_interpreter
def test_decay_gradient_float16_no_worse_than_torch(kernels):
    # q.dq - k.dk cancels; the kernels form it from float32 pair products and split states, so the decay
    # gradient stays as accurate as the float32 PyTorch reference on the same float16 inputs.
    kernels.CHUNKS_PER_SEGMENT = 2
    B, T, H, K = 1, 300, 2, 32
    q, k, v = (torch.randn(B, T, H, K).half() for _ in range(3))
    g = -0.1 * torch.rand(H)
    do = torch.randn(B, T, H, K)

    def grad_g(backend):
        g_leaf = g.clone().requires_grad_()
        if backend == "float64":
            o, _ = recurrence64(q, k, v, g_leaf, K ** -0.5)
        else:
            o, _ = lasp_hf.linear_attention(q, k, v, g_leaf, backend=backend)
        (o.double() * do).sum().backward()
        return g_leaf.grad

    ref = grad_g("float64")
    err, err_torch = rel_err(grad_g("triton"), ref), rel_err(grad_g("torch"), ref)
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@needs_interpreter
@pytest.mark.parametrize("g_mode", ["none", "head", "batch_head"])
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_step(kernels, g_mode, with_state):
    B, H, K, V = 3, 2, 32, 48
    q, k = torch.randn(B, H, K), torch.randn(B, H, K)
    v = torch.randn(B, H, V)
    g = {"none": None, "head": -torch.rand(H), "batch_head": -torch.rand(B, H)}[g_mode]
    state = torch.randn(B, H, K, V) if with_state else None
    o, new_state = lasp_hf.linear_attention_step(q, k, v, g, state=state, backend="triton")
    ref = state.double() if with_state else torch.zeros(B, H, K, V, dtype=torch.float64)
    if g is not None and with_state:
        ref = ref * (g.double().exp().view(1, H) if g.dim() == 1 else g.double().exp())[..., None, None]
    ref = ref + k.double()[..., :, None] * v.double()[..., None, :]
    o_ref = K ** -0.5 * (q.double()[..., None, :] @ ref).squeeze(-2)
    assert rel_err(o, o_ref) <= TOL_FP32 and rel_err(new_state, ref) <= TOL_FP32


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("g_mode", ["head", "channel"])
def test_recurrent_step_in_place(kernels, backend, g_mode):
    # K = V = 128: the Triton step splits V into several blocks of programs, each writing only the tile it read.
    B, H, K, V = 2, 2, 128, 128
    q, k, v = (torch.randn(B, H, D, dtype=torch.bfloat16) for D in (K, K, V))
    g = -torch.rand(H) if g_mode == "head" else -torch.rand(B, H, K)
    state = torch.randn(B, H, K, V)
    decay = g.double().exp().view(1, H, 1, 1) if g.dim() == 1 else g.double().exp()[..., None]
    ref = state.double() * decay + k.double()[..., :, None] * v.double()[..., None, :]
    o_ref = K ** -0.5 * (q.double()[..., None, :] @ ref).squeeze(-2)
    o, new_state = lasp_hf.linear_attention_step(q, k, v, g, state=state, backend=backend, inplace=True)
    assert new_state is state
    assert rel_err(state, ref) <= TOL_FP32 and rel_err(o, o_ref) <= TOL_BF16
    with pytest.raises(ValueError, match="contiguous float32"):
        lasp_hf.linear_attention_step(q, k, v, g, state=state.transpose(-1, -2), backend=backend, inplace=True)
    with pytest.raises(ValueError, match="got None"):
        lasp_hf.linear_attention_step(q, k, v, g, backend=backend, inplace=True)


@needs_interpreter
def test_recurrent_step_bfloat16(kernels):
    B, H, K, V = 2, 2, 16, 16
    q, k, v = (torch.randn(B, H, D, dtype=torch.bfloat16) for D in (K, K, V))
    g = -torch.rand(H)
    state = torch.randn(B, H, K, V)
    o, new_state = lasp_hf.linear_attention_step(q, k, v, g, state=state, backend="triton")
    assert o.dtype == torch.bfloat16 and new_state.dtype == torch.float32
    ref = state.double() * g.double().exp().view(1, H, 1, 1) + k.double()[..., :, None] * v.double()[..., None, :]
    o_ref = K ** -0.5 * (q.double()[..., None, :] @ ref).squeeze(-2)
    # The state is float32 whatever the inputs; only o is rounded to bfloat16.
    assert rel_err(new_state, ref) <= TOL_FP32 and rel_err(o, o_ref) <= TOL_BF16


# ----------------------------------------------------------------------------- state-only passes (SP hooks)

def _check_state_only(kernels, B, T, H, K, V, g_mode, *, dtype=torch.float32, cps=None, use_h0=True,
                      tol=TOL_FP32):
    from lasp_hf.kernels import triton as backend

    kernels.CHUNKS_PER_SEGMENT = cps
    k, v = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, V, dtype=dtype)
    g = _decay(g_mode, B, T, H)
    g = g.detach() if g is not None else None
    h0 = torch.randn(B, H, K, V) if use_h0 else None
    state = backend.final_state_only(k, v, g, initial_state=h0)
    dstate = backend.initial_state_grad_only(k, v, g, scale=0.7)
    for name, got, ref in (("final_state_only", state, final_state64(k, v, g, h0)),
                           ("initial_state_grad_only", dstate, initial_state_grad64(k, v, g, 0.7))):
        assert got.dtype == torch.float32 and got.shape == (B, H, K, V), name
        err = rel_err(got, ref)
        assert err <= tol, f"{name}: relative error {err:.2e} over {tol}"


@needs_interpreter
@pytest.mark.parametrize("g_mode", ["none", "head", "token"])
@pytest.mark.parametrize("T, cps", [(1, None), (63, None), (130, None), (130, 1), (200, 2)])
def test_state_only_passes(kernels, T, cps, g_mode):
    # cps=1 / 2: one- and two-chunk segments (the last one partial), folded afterwards.
    _check_state_only(kernels, 2, T, 2, 16, 32, g_mode, cps=cps)


@needs_interpreter
@pytest.mark.parametrize("use_h0", [False, True])
def test_state_only_passes_one_segment_per_row(kernels, use_h0):
    # No fold without an initial state: each row's segment state is the answer.
    _check_state_only(kernels, 3, 65, 2, 16, 16, "token", use_h0=use_h0)


@needs_interpreter
@pytest.mark.parametrize("g_mode", ["head", "token"])
def test_state_only_passes_several_blocks(kernels, monkeypatch, g_mode):
    # 16 x 16 state tiles over K = 48, V = 80: 3 x 5 programs per (segment, head), the last ones masked.
    from lasp_hf.kernels.triton import state_only

    monkeypatch.setattr(state_only, "MAX_BLOCK_K", 16)
    monkeypatch.setattr(state_only, "STATE_TILE", 256)
    _check_state_only(kernels, 1, 130, 2, 48, 80, g_mode, cps=1)


@needs_interpreter
def test_state_only_passes_bfloat16(kernels):
    _check_state_only(kernels, 1, 130, 2, 32, 32, "token", dtype=torch.bfloat16, cps=1, tol=TOL_BF16)


@needs_interpreter
def test_state_only_passes_empty(kernels):
    from lasp_hf.kernels import triton as backend

    k = torch.randn(1, 0, 2, 16)
    h0 = torch.randn(1, 2, 16, 16)
    assert torch.equal(backend.final_state_only(k, k, None, initial_state=h0), h0)
    assert torch.equal(backend.initial_state_grad_only(k, k, None, scale=1.0), torch.zeros(1, 2, 16, 16))


def test_sp_uses_the_triton_state_only_passes():
    # `tests/test_sp_linear_attention.py::test_sp_linear_attention_triton_local_pass` runs the SP op with
    # the Triton backend as local_impl: these are the names `lasp_hf.parallel.lasp` looks up on it.
    from lasp_hf.ops import _backend_module

    impl = _backend_module("triton")
    assert callable(getattr(impl, "final_state_only", None))
    assert callable(getattr(impl, "initial_state_grad_only", None))


@needs_interpreter
def test_segment_reuse_gives_the_op_its_step_one_and_lets_go_of_the_inputs(kernels):
    # What sequence parallelism does: step 1 and the fold before the op, then the op with the kept segment states.
    # Same output and gradients as the op alone; the reuse object keeps no input once the forward has run (it lives
    # on the autograd node until backward, where saved-tensor hooks could not reach them).
    kernels.CHUNKS_PER_SEGMENT = 1
    B, T, H, K, V = 1, 200, 2, 16, 16
    q, k, v = (torch.randn(B, T, H, D) for D in (K, K, V))
    g = -0.2 * torch.rand(H)
    do = torch.randn(B, T, H, V)
    results = []
    for use_reuse in (False, True):
        leaves = _leaves(q, k, v)
        reuse = kernels.SegmentReuse.make(*leaves, g, accurate_states=False) if use_reuse else None
        final = reuse.final_state(leaves[1], leaves[2], g) if use_reuse else None
        o, _ = kernels.chunk_linear_attention(*leaves, g, scale=0.5, reuse=reuse)
        if use_reuse:
            # Nothing on the reuse object shares memory with an input (it stays on the autograd node until backward).
            inputs = {x.untyped_storage().data_ptr() for x in leaves}
            held = [t for value in vars(reuse).values() for t in (value if isinstance(value, tuple) else (value,))
                    if isinstance(t, torch.Tensor)]
            assert reuse.segment_states is None and not any(t.untyped_storage().data_ptr() in inputs for t in held)
            ref_final = final_state64(*(x.double() for x in (k, v)), g.double(), None)
            assert rel_err(final, ref_final) <= TOL_FP32
        results.append([o, *torch.autograd.grad(o, leaves, do)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
