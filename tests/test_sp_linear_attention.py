"""LASP under gloo (W = 2, 3, 4 CPU processes) against the single-process op on the whole sequence.

Every rank builds the same full inputs from one seed, runs the unsharded op (the reference) and
the sharded op on its slice, and returns relative errors of o, final_state and every gradient.
Gradients of tensors every rank passes whole (g [H], initial_state) are summed across ranks by
hand, as DDP would. One spawn per W runs all cases (modes x g modes x layouts).
"""

from __future__ import annotations

import contextlib
import functools
import zlib

import pytest
import torch
import torch.distributed as dist
from distributed_utils import relative_error, run_distributed
from lasp_hf import SequenceParallelContext, linear_attention
from lasp_hf.kernels import reference
from lasp_hf.parallel.lasp import sp_linear_attention

H, K, V = 2, 8, 6
TOL = 1e-4  # float32 inputs, float32 states: the two paths differ only by summation order
LOCAL_LENS = {2: (100,), 3: (37,), 4: (65, 1)}  # not multiples of the reference's chunk (64); one token
G_MODES = ("none", "head", "token")
MODES = ("ring", "allgather")


def _layouts(W: int, L: int) -> dict:
    """Document boundaries of the FULL packed sequence (T = W * L); None = unpacked rows (B = 2)."""
    T = W * L
    span = [0, 3, min(2 * L + 5, T - 1), T]                         # doc 1 spans 3 ranks (2 when W = 2)
    at_cuts = sorted({0, L, L + 1, T - 1, T} | {r * L for r in range(W)})  # cuts exactly at ranks, length-1 docs
    at_cuts.insert(2, L)                                              # plus an empty document at a cut
    gen = torch.Generator().manual_seed(W)
    inner = torch.randperm(T - 1, generator=gen)[: 2 * W].add(1).sort().values.tolist()
    return {"dense": None, "span": span, "at_cuts": at_cuts, "random": [0] + inner + [T], "one_doc": [0, T]}


def _inputs(W, L, g_mode, bounds, seed, dims=(H, K, V)):
    H, K, V = dims
    gen = torch.Generator().manual_seed(seed)
    B = 1 if bounds is not None else 2
    T = W * L
    N = len(bounds) - 1 if bounds is not None else B
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = {
        "none": None,
        "head": -torch.rand(H, generator=gen) * 0.2 - 0.01,
        "token": torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 3.0),
    }[g_mode]
    h0 = torch.randn(N, H, K, V, generator=gen)
    w_o = torch.randn(B, T, H, V, generator=gen)
    w_final = torch.randn(N, H, K, V, generator=gen)
    cu = torch.tensor(bounds, dtype=torch.int32) if bounds is not None else None
    return q, k, v, g, h0, w_o, w_final, cu


def _grads(loss, tensors):
    needed = [t for t in tensors if t is not None]
    got = iter(torch.autograd.grad(loss, needed, allow_unused=True))
    return [next(got) if t is not None else None for t in tensors]


class _StateOnlyHooks:
    """The PyTorch backend plus the optional state-only entry points a backend may offer
    (`final_state_only`, `initial_state_grad_only`), written here through the reference's own
    autograd so that the op's hook path is checked on CPU."""

    chunk_linear_attention = staticmethod(reference.chunk_linear_attention)

    @staticmethod
    def final_state_only(k, v, g, *, initial_state):
        return reference.chunk_linear_attention(k, k, v, g, scale=1.0, initial_state=initial_state,
                                                output_final_state=True)[1]

    @staticmethod
    def initial_state_grad_only(q, do, g, *, scale):
        B, T, H, K = q.shape
        with torch.enable_grad():
            h0 = torch.zeros(B, H, K, do.shape[-1], requires_grad=True)
            o, _ = reference.chunk_linear_attention(q, torch.zeros_like(q), torch.zeros(B, T, H, do.shape[-1]), g,
                                                    scale=scale, initial_state=h0)
            return torch.autograd.grad((o.float() * do.float()).sum(), h0)[0]


def _sp_op(backend, q, k, v, g, **kwargs):
    """The SP op through `linear_attention`, or straight through `sp_linear_attention` with the hooks."""
    if backend == "hooks":
        return sp_linear_attention(q, k, v, g, scale=q.shape[-1] ** -0.5, local_impl=_StateOnlyHooks, **kwargs)
    return linear_attention(q, k, v, g, backend=backend, **kwargs)


def _op_worker(W: int, backend: str = "torch", layouts=None, g_modes=G_MODES, dims=(H, K, V)) -> dict:
    """Runs on every rank; returns {case: {quantity: relative error}}.

    The SP op runs on `backend`; the reference is always the unsharded PyTorch op. dims = (H, K, V).
    """
    rank = dist.get_rank()
    sp = SequenceParallelContext.from_group(dist.group.WORLD)
    errors = {}
    for L in LOCAL_LENS[W]:
        errors.update(_op_cases(W, L, rank, sp, backend, layouts, g_modes, dims))
    return errors


def _op_cases(W, L, rank, sp, backend, layouts, g_modes, dims) -> dict:
    mine = slice(rank * L, (rank + 1) * L)
    errors = {}
    for layout, bounds in _layouts(W, L).items():
        if layouts is not None and layout not in layouts:
            continue
        for g_mode in g_modes:
            q, k, v, g, h0, w_o, w_final, cu = _inputs(W, L, g_mode, bounds, seed=zlib.crc32(f"{W}{L}{layout}{g_mode}".encode()), dims=dims)
            # Reference: the unsharded op.
            leaves = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, g, h0)]
            o_ref, final_ref = linear_attention(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                                cu_seqlens=cu, backend="torch")
            ref_grads = _grads((o_ref * w_o).sum() + (final_ref * w_final).sum(), leaves)
            per_token_g = g_mode == "token"
            for mode in MODES:
                local = [q[:, mine], k[:, mine], v[:, mine], g[:, mine] if per_token_g else g, h0]
                local = [x.clone().requires_grad_() if x is not None else None for x in local]
                o, final = _sp_op(backend, *local[:4], initial_state=local[4], output_final_state=True,
                                  cu_seqlens=cu, sp_group=sp, sp_mode=mode)
                # Each rank weighs final_state differently (weights sum to 1): dS_final must be summed.
                share = (rank + 1) / (W * (W + 1) / 2)
                loss = (o * w_o[:, mine]).sum() + share * (final * w_final).sum()
                grads = _grads(loss, local)
                # g [H] and initial_state are passed whole by every rank: sum the contributions by hand.
                for i in ((3, 4) if g_mode == "head" else (4,)):
                    total = grads[i].clone() if grads[i] is not None else torch.zeros_like(local[i])
                    dist.all_reduce(total)
                    grads[i] = total
                case = errors.setdefault(f"L={L}/{layout}/{g_mode}/{mode}", {})
                case["o"] = relative_error(o, o_ref[:, mine])
                case["final"] = relative_error(final, final_ref)
                for name, got, ref in zip(("dq", "dk", "dv", "dg", "dh0"), grads, ref_grads):
                    if ref is None:
                        continue
                    if name != "dh0" and not (name == "dg" and not per_token_g):
                        ref = ref[:, mine]
                    case[name] = relative_error(got, ref)
    return errors


@functools.cache
def _run_ops(W: int) -> list:
    return run_distributed(_op_worker, W, W)


def _failures(results) -> list:
    return [
        f"rank {rank} {case} {name}: {err:.2e}"
        for rank, errors in enumerate(results)
        for case, quantities in errors.items()
        for name, err in quantities.items()
        if not err <= TOL
    ]


@pytest.mark.distributed
@pytest.mark.parametrize("W", [2, 3, 4])
def test_sp_linear_attention_matches_unsharded(W):
    results = _run_ops(W)
    bad = _failures(results)
    assert not bad, "\n".join(bad)
    # Every case checked o, final_state and the gradients of q, k, v and initial_state (and g).
    for case, quantities in results[0].items():
        expected = {"o", "final", "dq", "dk", "dv", "dh0"} | ({"dg"} if "/none/" not in case else set())
        assert set(quantities) == expected, (case, sorted(quantities))


@pytest.mark.distributed
def test_sp_linear_attention_triton_local_pass():
    """The Triton kernels as the local pass (in Triton's interpreter on CPU), W = 2."""
    pytest.importorskip("triton")
    # Head dims of 16: the kernels' tensor descriptors need 16-byte aligned rows.
    results = run_distributed(_op_worker, 2, 2, "triton", ("dense", "span", "at_cuts"), ("head", "token"), (2, 16, 16),
                              start_method="spawn", env={"TRITON_INTERPRET": "1"})
    bad = _failures(results)
    assert not bad, "\n".join(bad)
    assert len(results[0]) == 3 * 2 * 2


def _reuse_worker(W: int) -> dict:
    """`_op_worker` on the Triton backend with one chunk per segment, so every rank's plan has several
    segments and the SP op hands its state-only passes' per-segment results to the local pass and the
    local backward (`SegmentReuse`); also counts how often the op took them."""
    from lasp_hf.kernels.triton import chunk

    chunk.CHUNKS_PER_SEGMENT = 1
    taken = {"states": 0, "dstates": 0}
    take_states, take_dstates = chunk.SegmentReuse.take_states, chunk.SegmentReuse.take_dstates

    def counting(method, name):
        def wrapper(self, *args):
            got = method(self, *args)
            taken[name] += got is not None
            return got
        return wrapper

    chunk.SegmentReuse.take_states = counting(take_states, "states")
    chunk.SegmentReuse.take_dstates = counting(take_dstates, "dstates")
    # 100 tokens per rank: two segments of one chunk each on every rank, whatever W.
    sp = SequenceParallelContext.from_group(dist.group.WORLD)
    errors = _op_cases(W, 100, dist.get_rank(), sp, "triton", ("dense",), G_MODES, (2, 16, 16))
    errors["taken"] = {name: float(count) for name, count in taken.items()}
    return errors


@pytest.mark.distributed
@pytest.mark.parametrize("W", [2, 3])
def test_sp_reuses_the_state_only_passes_in_the_local_pass(W):
    """Dense input cut into several segments per rank: the local pass and local backward take the per-segment
    states the SP exchange computed (instead of computing them again), and the result is still exact (W = 3: a
    middle rank, which both receives and sends)."""
    pytest.importorskip("triton")
    results = run_distributed(_reuse_worker, W, W, start_method="spawn", env={"TRITON_INTERPRET": "1"})
    taken = [errors.pop("taken") for errors in results]
    bad = _failures(results)
    assert not bad, "\n".join(bad)
    assert len(results[0]) == 3 * 2  # g modes x (ring, allgather)
    # Once per g mode and mode, on every rank: rank 0 computes the states it hands on, rank 1 the gradient of the
    # state it received; the other step 1 each rank runs before waiting for the exchange (prepare_*).
    assert all(count == 6 for counts in taken for count in counts.values()), taken


@pytest.mark.distributed
def test_sp_linear_attention_state_only_hooks():
    """A backend's state-only kernels (final_state_only, initial_state_grad_only) replace the op's own."""
    results = run_distributed(_op_worker, 3, 3, "hooks", ("dense", "span", "at_cuts"))
    bad = _failures(results)
    assert not bad, "\n".join(bad)
    assert len(results[0]) == 3 * 3 * 2


def _hooks_worker(W: int) -> dict:
    """The SP op under saved-tensor hooks (what checkpointing and save_on_cpu install) against the unsharded op,
    and what its autograd node holds: under hooks only tensors saved through them (its local graph on ctx would
    keep q, k, v and o alive where the hooks cannot reach them), without hooks the graph recorded in forward."""
    rank = dist.get_rank()
    sp = SequenceParallelContext.from_group(dist.group.WORLD)
    L = 40
    mine = slice(rank * L, (rank + 1) * L)
    q, k, v, g, h0, w_o, _, cu = _inputs(W, L, "token", None, seed=7)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o_ref, _ = linear_attention(*leaves, backend="torch")
    ref_grads = _grads((o_ref * w_o).sum(), leaves)
    errors, held = {}, {}
    packed = []

    def pack(tensor):
        packed.append(tensor.shape)
        return tensor.clone()

    for hooked in (False, True):
        local = [x[:, mine].clone().requires_grad_() for x in (q, k, v, g)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if hooked else contextlib.nullcontext():
            o, _ = linear_attention(*local, backend="torch", sp_group=sp)
        held[f"hooks={hooked}"] = {"graph_on_ctx": float(o.grad_fn.inner is not None),
                                   "saved_through_hooks": float(len(packed))}
        grads = _grads((o * w_o[:, mine]).sum(), local)
        case = errors.setdefault(f"hooks={hooked}", {})
        case["o"] = relative_error(o, o_ref[:, mine])
        for name, got, ref in zip(("dq", "dk", "dv", "dg"), grads, ref_grads):
            case[name] = relative_error(got, ref[:, mine])
        packed.clear()
    errors["held"] = held
    return errors


@pytest.mark.distributed
def test_sp_op_under_saved_tensor_hooks_keeps_no_graph_on_ctx():
    results = run_distributed(_hooks_worker, 2, 2)
    held = [errors.pop("held") for errors in results]
    bad = _failures(results)
    assert not bad, "\n".join(bad)
    for rank_held in held:
        assert rank_held["hooks=False"]["graph_on_ctx"] == 1.0
        assert rank_held["hooks=True"]["graph_on_ctx"] == 0.0
        assert rank_held["hooks=True"]["saved_through_hooks"] >= 4  # q, k, v, g at least


def _order_worker(W: int) -> dict:
    """Runs the ring with final_state and its gradient (the case with collectives inside the op) and records, per
    rank, the order of receive posts, receive waits and collectives."""
    from lasp_hf.parallel import comm

    log = []
    irecv, received = comm._irecv, comm._received
    all_reduce, all_gather = comm.all_reduce_sum, comm.all_gather_stacked

    def posting(x, peer, sp):
        work = irecv(x, peer, sp)
        log.append(("post", id(work)))
        return work

    def waiting(pending, sp):
        if pending is not None:
            log.append(("wait", id(pending[1])))
        return received(pending, sp)

    def collective(fn):
        def wrapper(*args, **kwargs):
            log.append(("collective", None))
            return fn(*args, **kwargs)
        return wrapper

    comm._irecv, comm._received = posting, waiting
    comm.all_reduce_sum, comm.all_gather_stacked = collective(all_reduce), collective(all_gather)
    rank = dist.get_rank()
    sp = SequenceParallelContext.from_group(dist.group.WORLD)
    L = 40
    mine = slice(rank * L, (rank + 1) * L)
    q, k, v, g, h0, w_o, w_final, cu = _inputs(W, L, "head", [0, 3, 50, W * L], seed=3)
    local = [x.clone().requires_grad_() for x in (q[:, mine], k[:, mine], v[:, mine], h0)]
    o, final = linear_attention(*local[:3], g, initial_state=local[3], output_final_state=True, cu_seqlens=cu,
                                backend="torch", sp_group=sp, sp_mode="ring")
    _grads((o * w_o[:, mine]).sum() + (final * w_final).sum(), local)
    return {"log": log}


@pytest.mark.distributed
def test_ring_issues_no_collective_while_a_receive_is_posted():
    # NCCL runs a group's point-to-point ops and collectives in one order on every rank: a collective issued between
    # posting a receive and waiting for it can wait for a send that its peer issues only after that collective.
    for rank, result in enumerate(run_distributed(_order_worker, 2, 2)):
        open_receives = set()
        for kind, key in result["log"]:
            if kind == "post":
                open_receives.add(key)
            elif kind == "wait":
                open_receives.discard(key)
            else:
                assert not open_receives, f"rank {rank}: a collective while a receive is posted: {result['log']}"
        assert any(kind == "collective" for kind, _ in result["log"]) and any(k == "post" for k, _ in result["log"])


def _checkpoint_worker(W: int) -> dict:
    """The SP op on the Triton kernels (interpreter) inside non-reentrant activation checkpointing: its tensors go
    through save_for_backward, the checkpoint drops them and recomputes the layer (exchange included) in backward."""
    from torch.utils.checkpoint import checkpoint

    rank = dist.get_rank()
    sp = SequenceParallelContext.from_group(dist.group.WORLD)
    L = 80
    mine = slice(rank * L, (rank + 1) * L)
    q, k, v, g, h0, w_o, _, _ = _inputs(W, L, "token", None, seed=11, dims=(2, 16, 16))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o_ref, _ = linear_attention(*leaves, backend="torch")
    ref_grads = _grads((o_ref * w_o).sum(), leaves)
    errors = {}
    for mode in MODES:
        local = [x[:, mine].clone().requires_grad_() for x in (q, k, v, g)]
        o = checkpoint(lambda *xs: linear_attention(*xs, backend="triton", sp_group=sp, sp_mode=mode)[0], *local,
                       use_reentrant=False)
        case = errors.setdefault(mode, {"o": relative_error(o, o_ref[:, mine])})
        for name, got, ref in zip(("dq", "dk", "dv", "dg"), _grads((o * w_o[:, mine]).sum(), local), ref_grads):
            case[name] = relative_error(got, ref[:, mine])
    return errors


@pytest.mark.distributed
def test_sp_triton_local_pass_under_activation_checkpointing():
    pytest.importorskip("triton")
    results = run_distributed(_checkpoint_worker, 2, 2, start_method="spawn", env={"TRITON_INTERPRET": "1"})
    bad = _failures(results)
    assert not bad, "\n".join(bad)
    assert set(results[0]) == set(MODES) and all(len(case) == 5 for case in results[0].values())


def test_head_decay_cache_follows_the_tensor_and_its_updates():
    """a_r = exp(g * L) for per-head g is cached per tensor; an in-place update, another L or another tensor with
    the same values gets a fresh result, and a g that requires grad is never cached (its graph must stay)."""
    from lasp_hf.parallel import lasp

    g = -torch.rand(4, dtype=torch.float64).float()
    first = lasp._rank_decay(g, 1, 10, 4, g.device)
    torch.testing.assert_close(first, torch.exp(g.double() * 10).float().view(1, 4, 1, 1))
    assert lasp._rank_decay(g, 1, 10, 4, g.device) is first  # cached
    assert lasp._rank_decay(g, 2, 10, 4, g.device).shape == (2, 4, 1, 1)
    torch.testing.assert_close(lasp._rank_decay(g, 1, 3, 4, g.device), torch.exp(g * 3).view(1, 4, 1, 1))
    g.mul_(2.0)  # in place: a new version
    torch.testing.assert_close(lasp._rank_decay(g, 1, 10, 4, g.device), torch.exp(g * 10).view(1, 4, 1, 1))
    learned = g.clone().requires_grad_()
    a = lasp._rank_decay(learned, 1, 10, 4, g.device)
    assert a.requires_grad and lasp._rank_decay(learned, 1, 10, 4, g.device) is not a
