"""init_sequence_parallel (W = 4 gloo processes: 2 SP groups x 2 DP groups), the op on SP
sub-groups whose neighbours are not global ranks r +- 1, and clear errors for bad groups and shapes."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from distributed_utils import relative_error, run_distributed
from lasp_hf import SequenceParallelContext, init_sequence_parallel, linear_attention
from torch.distributed.device_mesh import init_device_mesh


def _error(fn) -> str:
    """The ValueError message fn raises ('' if none)."""
    try:
        fn()
    except ValueError as err:
        return str(err)
    return ""


def _groups_worker():
    rank = dist.get_rank()
    checks = {}
    # sp_size = 2 over 4 ranks: SP groups {0, 1}, {2, 3}; DP groups {0, 2}, {1, 3}.
    ctx = init_sequence_parallel(2, mode="allgather")
    checks["sp"] = (ctx.rank, ctx.world_size, ctx.mode) == (rank % 2, 2, "allgather")
    checks["dp"] = (ctx.dp_rank, ctx.dp_size) == (rank // 2, 2)
    base = rank - rank % 2
    checks["neighbours"] = (ctx.prev_rank, ctx.next_rank) == ((None, base + 1) if rank % 2 == 0 else (base, None))
    x = torch.tensor([float(rank)])
    dist.all_reduce(x, group=ctx.group)
    y = torch.tensor([float(rank)])
    dist.all_reduce(y, group=ctx.dp_group)
    checks["sp_members"] = x.item() == 2 * base + 1
    checks["gloo_exchanges_through_the_group"] = ctx.direct is None  # (direct NCCL: NCCL groups only)
    checks["dp_members"] = y.item() == (rank % 2) * 2 + 2

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    from_mesh = init_sequence_parallel(2, device_mesh=mesh)
    checks["mesh"] = (from_mesh.rank, from_mesh.world_size, from_mesh.dp_rank) == (rank % 2, 2, rank // 2)
    checks["mesh_size_error"] = "'sp' dim has size 2" in _error(lambda: init_sequence_parallel(4, device_mesh=mesh))
    checks["sp_size_error"] = "does not divide the world size 4" in _error(lambda: init_sequence_parallel(3))
    checks["sp_size_zero"] = ">= 1" in _error(lambda: init_sequence_parallel(0))
    checks["mode_error"] = "mode" in _error(lambda: init_sequence_parallel(2, mode="tree"))

    # The op on each SP sub-group (two independent sequences) against the unsharded op.
    B, L, H, K, V = 1, 9, 2, 4, 3
    gen = torch.Generator().manual_seed(rank // 2)  # one sequence per SP group
    q, k, v = (torch.randn(B, 2 * L, H, d, generator=gen) for d in (K, K, V))
    g = -torch.rand(B, 2 * L, H, generator=gen)
    o_ref, s_ref = linear_attention(q, k, v, g, output_final_state=True, backend="torch")
    mine = slice(ctx.rank * L, (ctx.rank + 1) * L)
    for mode in ("ring", "allgather"):
        o, s = linear_attention(q[:, mine], k[:, mine], v[:, mine], g[:, mine], output_final_state=True,
                                sp_group=ctx, sp_mode=mode, backend="torch")
        checks[f"subgroup_{mode}"] = relative_error(o, o_ref[:, mine]) < 1e-5 and relative_error(s, s_ref) < 1e-5
        # A bare ProcessGroup works too (wrapped in a context; the mode comes from sp_mode).
        o2, _ = linear_attention(q[:, mine], k[:, mine], v[:, mine], g[:, mine], sp_group=ctx.group, sp_mode=mode,
                                 backend="torch")
        checks[f"bare_group_{mode}"] = relative_error(o2, o_ref[:, mine]) < 1e-5

    # Inference (no graph), gradients for only some inputs, and bf16 inputs.
    with torch.no_grad():
        o, _ = linear_attention(q[:, mine], k[:, mine], v[:, mine], g[:, mine], sp_group=ctx, backend="torch")
    checks["no_grad"] = relative_error(o, o_ref[:, mine]) < 1e-5 and o.grad_fn is None
    v_full = v.clone().requires_grad_()
    dv_ref, = torch.autograd.grad((linear_attention(q, k, v_full, g, backend="torch")[0] ** 2).sum(), v_full)
    v_mine = v[:, mine].clone().requires_grad_()
    o, _ = linear_attention(q[:, mine], k[:, mine], v_mine, g[:, mine], sp_group=ctx, sp_mode="allgather",
                            backend="torch")
    dv, = torch.autograd.grad((o ** 2).sum(), v_mine)
    checks["grad_of_v_only"] = relative_error(dv, dv_ref[:, mine]) < 1e-5
    bf16 = [x[:, mine].bfloat16() for x in (q, k, v)]
    o, s = linear_attention(*bf16, g[:, mine], output_final_state=True, sp_group=ctx, backend="torch")
    checks["bf16"] = o.dtype == torch.bfloat16 and s.dtype == torch.float32 and \
        relative_error(o, o_ref[:, mine]) < 1e-2 and relative_error(s, s_ref) < 1e-2

    # Errors (every rank of the group raises, so no rank is left waiting).
    def op(sp, T=L, H=H, **kw):
        return linear_attention(torch.randn(1, T, H, K), torch.randn(1, T, H, K), torch.randn(1, T, H, V),
                                sp_group=sp, backend="torch", **kw)

    wrong_size = SequenceParallelContext(group=ctx.group, rank=ctx.rank, world_size=3)
    msg = _error(lambda: op(wrong_size))
    checks["error_world_size"] = f"rank {ctx.rank} of 3" in msg and f"rank {ctx.rank} of 2" in msg
    checks["error_type"] = "ProcessGroup" in _error(lambda: op("group"))
    msg = _error(lambda: op(ctx, T=L + ctx.rank))
    checks["error_lengths"] = "different shapes" in msg and "per rank" in msg
    msg = _error(lambda: op(ctx, H=H + ctx.rank))
    checks["error_heads"] = "different shapes" in msg
    msg = _error(lambda: op(ctx, cu_seqlens=torch.tensor([0, 3, L], dtype=torch.int32)))
    checks["error_cu_total"] = f"{L} * 2 = {2 * L}" in msg
    msg = _error(lambda: op(ctx, cu_seqlens=torch.tensor([0, 3, 2 * L], dtype=torch.int32),
                             initial_state=torch.zeros(3, H, K, V)))
    checks["error_state_shape"] = "initial_state must be [N, H, K, V]" in msg and "(2, 2, 4, 3)" in msg
    msg = _error(lambda: op(ctx, sp_mode="tree"))
    checks["error_mode"] = "sp_mode" in msg
    # The group still works after the errors.
    o, _ = op(ctx)
    checks["usable_after_errors"] = o.shape == (1, L, H, V)
    return checks


@functools.cache
def _run():
    return run_distributed(_groups_worker, 4)


@pytest.mark.distributed
def test_init_sequence_parallel_and_errors():
    bad = [f"rank {r}: {name}" for r, checks in enumerate(_run()) for name, ok in checks.items() if not ok]
    assert not bad, bad


def test_init_sequence_parallel_needs_torch_distributed():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        init_sequence_parallel(1)


def test_sp_groups_ask_nccl_for_high_priority_streams(monkeypatch):
    """NCCL SP groups get high-priority streams (the exchange's kernels then take SMs ahead of the local pass's);
    gloo groups no options; LASP_HF_SP_HIGH_PRIORITY=0 turns the priority off."""
    from lasp_hf.parallel import context

    assert context._sp_group_options("gloo") is None
    monkeypatch.setenv("LASP_HF_SP_HIGH_PRIORITY", "0")
    assert context._sp_group_options("nccl") is None
    monkeypatch.delenv("LASP_HF_SP_HIGH_PRIORITY")
    if not hasattr(dist, "ProcessGroupNCCL"):
        assert context._sp_group_options("nccl") is None  # a CPU-only torch build: plain groups
        return
    assert context._sp_group_options("nccl").is_high_priority_stream


def test_direct_nccl_is_for_nccl_groups_only_and_can_be_turned_off(monkeypatch):
    """`nccl.wanted`: gloo groups and single-rank groups exchange through the process group; LASP_HF_DIRECT_NCCL=0
    turns the direct path off; an NCCL error names the switch."""
    from lasp_hf.parallel import nccl

    class Group:
        pass

    sizes, backends = {}, {}
    monkeypatch.setattr(dist, "get_world_size", lambda group: sizes[group])
    monkeypatch.setattr(dist, "get_backend", lambda group: backends[group])
    monkeypatch.setattr(nccl, "load_library", lambda: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gloo, one, two = Group(), Group(), Group()
    sizes.update({gloo: 2, one: 1, two: 2})
    backends.update({gloo: "gloo", one: "nccl", two: "nccl"})
    assert not nccl.wanted(gloo) and not nccl.wanted(one) and nccl.wanted(two)
    monkeypatch.setenv("LASP_HF_DIRECT_NCCL", "0")
    assert not nccl.wanted(two)
    monkeypatch.delenv("LASP_HF_DIRECT_NCCL")
    monkeypatch.setattr(nccl, "load_library", lambda: None)
    assert not nccl.wanted(two)

    class Lib:
        @staticmethod
        def ncclGetErrorString(code):
            return b"unhandled cuda error"

    with pytest.raises(RuntimeError, match="ncclSend failed: unhandled cuda error .*LASP_HF_DIRECT_NCCL=0"):
        nccl._check(Lib, 1, "ncclSend")
    nccl._check(Lib, 0, "ncclSend")  # success: nothing raised
