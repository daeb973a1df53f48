"""The public op: `linear_attention` (every backend, with or without sequence parallelism) and
`linear_attention_step` (one decoding token). Checks user input once, then dispatches.

Shapes: B batch, T tokens, H heads, K query/key head dim, V value head dim, N packed sequences.
"""

from __future__ import annotations

import logging
import os

import torch

from lasp_hf.kernels import reference, reference_gla
from lasp_hf.kernels.host import host_bounds

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BACKENDS = ("auto", "torch", "triton")
_SP_MODES = ("ring", "allgather")
_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA tensors (when Triton imports), "torch" elsewhere."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if triton_available():
                return "triton"
            _warn_once("Triton is not installed: linear_attention falls back to the (slower) PyTorch reference.")
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the `triton` package; install it or pass backend='torch'.")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got tensors on {device}); set TRITON_INTERPRET=1 to run "
                "the kernels in Triton's interpreter on CPU, or pass backend='torch'."
            )
    return backend


def _backend_module(backend: str):
    if backend == "torch":
        return reference
    try:
        from lasp_hf.kernels import triton as triton_kernels
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ValueError(f"the Triton kernels could not be imported ({err}); pass backend='torch'.") from err
    if not hasattr(triton_kernels, "chunk_linear_attention"):
        raise NotImplementedError("the Triton backend of linear_attention is not built yet; pass backend='torch'.")
    return triton_kernels


def _per_channel_module(impl):
    """The backend's implementation for a decay per key channel (g [B, T, H, K]: GLA)."""
    if impl is reference:
        return reference_gla
    from lasp_hf.kernels.triton import gla_chunk

    return gla_chunk


def _fit_backend(resolved: str, asked: str, K: int, V: int) -> str:
    """The Triton kernels tile K and V in blocks of 16, up to 256: other head dims use the reference."""
    if resolved != "triton" or (K % 16 == 0 and V % 16 == 0 and K <= 256 and V <= 256):
        return resolved
    message = f"the Triton kernels need K and V to be multiples of 16 up to 256, got K = {K}, V = {V}"
    if asked == "triton":
        raise ValueError(message + "; pass backend='torch' or 'auto'.")
    _warn_once(message + ": linear_attention falls back to the (slower) PyTorch reference.")
    return "torch"


# Set to False to skip the decay check (`check_decay`), e.g. when timing the op alone.
CHECK_DECAY = True
# (id, version) of per-head decays already checked, with the tensor kept alive so its id names no other tensor: a
# fixed per-head decay (lightning attention's slopes) is checked once, not at every layer of every step.
_CHECKED_DECAYS: dict = {}


def check_decay(g: torch.Tensor | None, name: str = "g") -> None:
    """g must be <= 0 (a natural-log decay; -inf, a decay to exactly zero, restarts the state): g > 0 makes the
    state grow without bound and NaN poisons it, silently, for long sequences.

    CPU tensors are checked here, and the error names the first offending value and its position. CUDA tensors
    are checked without a host sync: an asynchronous device assert (`torch._assert_async`) that fails a later CUDA
    call (at the latest the next synchronizing one) with the message below (rerun on CPU, or with
    CUDA_LAUNCH_BLOCKING=1, for the position). It is skipped while a CUDA graph is being captured (the eager
    warm-up before capture checks) or torch.compile traces, for a tensor already checked at its current version,
    and when `CHECK_DECAY` is False.
    """
    if g is None or not CHECK_DECAY or torch.compiler.is_compiling():
        return
    # Only small per-head decays are remembered: a per-token one is a new tensor at every call.
    try:
        key = (id(g), g._version) if g.dim() == 1 else None
    except RuntimeError:  # an inference-mode tensor has no version counter
        key = None
    if key is not None and _CHECKED_DECAYS.get(key) is g:
        return
    if g.device.type == "cpu":
        bad = ~(g.detach() <= 0)  # NaN compares False
        if bad.any():
            index = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(
                f"{name} must be a natural-log decay <= 0 (-inf restarts the state), got {g.detach()[index].item()} "
                f"at {name}[{', '.join(map(str, index))}] ({int(bad.sum())} such value(s))"
            )
    elif g.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    else:
        torch._assert_async((g.detach() <= 0).all(), f"lasp_hf: {name} must be a natural-log decay <= 0 "
                            "(-inf restarts the state); it holds a positive or NaN value")
    if key is not None:
        if len(_CHECKED_DECAYS) >= 64:
            _CHECKED_DECAYS.clear()
        _CHECKED_DECAYS[key] = g


def _check_dims(q, v) -> None:
    B, _, H, K = q.shape
    if B < 1 or H < 1 or K < 1 or v.shape[-1] < 1:
        raise ValueError(
            f"q, k, v need at least one batch row, head and feature: got B = {B}, H = {H}, K = {K}, "
            f"V = {v.shape[-1]}"
        )


def _check_inputs(q, k, v, g, initial_state, cu_seqlens, sp_mode):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, T, H, D], got {got}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T < 1:
        raise ValueError(f"the sequence length T must be >= 1, got {T}")
    _check_dims(q, v)
    if g is not None:
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise ValueError("g must be None or a floating-point tensor of log-decays (<= 0)")
        if g.shape not in (torch.Size([H]), torch.Size([B, T, H]), torch.Size([B, T, H, K])):
            raise ValueError(f"g must be None, [H] = [{H}], [B, T, H] = {[B, T, H]} or [B, T, H, K] = {[B, T, H, K]}, "
                             f"got {list(g.shape)}")
        if g.device != q.device:
            raise ValueError(f"g must be on q's device {q.device}, got {g.device}")
        check_decay(g)
    num_states = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1] of cumulative sequence lengths")
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B = {B}")
        bounds = host_bounds(cu_seqlens)
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds)):
            raise ValueError(
                f"cu_seqlens must start at 0, end at T = {T} and never decrease, got {bounds[:4]}...{bounds[-2:]}"
            )
        num_states = len(bounds) - 1
    if initial_state is not None:
        expected = (num_states, H, K, V)
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            what = "[N, H, K, V]" if cu_seqlens is not None else "[B, H, K, V]"
            raise ValueError(f"initial_state must be {what} = {expected}, got {got}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on q's device {q.device}, got {initial_state.device}")
    if sp_mode not in _SP_MODES:
        raise ValueError(f"sp_mode must be one of {_SP_MODES}, got {sp_mode!r}")


def linear_attention(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, sp_group=None, sp_mode="ring", backend="auto"):
    """Causal linear attention with an optional decay, on one device or sequence-parallel (LASP).

    Per batch row and head, with S_0 = initial_state (zeros if None):
        S_t = exp(g_t) * S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t,    final_state = S_T.

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V]. float32, bfloat16 or float16, one dtype.
        g: natural-log decay (<= 0). None (no decay), [H] (one fixed decay per head: lightning
            attention / RetNet), [B, T, H] (per token and head: gated), or [B, T, H, K] (per token, head
            and key channel: GLA / HGRN2, S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t; -inf restarts a
            channel). Gradients flow to it.
        scale: multiplies q; defaults to K ** -0.5 (TransNormerLLM passes 1.0).
        initial_state: [B, H, K, V] (or [N, H, K, V] with cu_seqlens), any float dtype; the
            state before the first token. Under SP: the state before the whole sequence.
        output_final_state: also return the float32 state after the last token.
        cu_seqlens: int [N + 1], B == 1: packed sequences, the state resets at each boundary.
            Under SP it describes the full (unsharded) packed sequence on every rank.
        sp_group: None, a torch.distributed ProcessGroup or a `SequenceParallelContext`. Each
            rank then passes its own contiguous slice of T, in rank order.
        sp_mode: "ring" (LASP: the state hops rank to rank) or "allgather" (LASP-2).
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "torch" or "triton".

    Returns:
        o: [B, T, H, V] in v's dtype; final_state: float32 [B, H, K, V] ([N, H, K, V] with
        cu_seqlens) or None.
    """
    if sp_group is not None and cu_seqlens is not None:
        # Under SP, cu_seqlens spans the whole sequence, so only its shape can be checked here.
        _check_inputs(q, k, v, g, None, None, sp_mode)
    else:
        _check_inputs(q, k, v, g, initial_state, cu_seqlens, sp_mode)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    impl = _backend_module(_fit_backend(resolve_backend(backend, q.device), backend, q.shape[-1], v.shape[-1]))
    if g is not None and g.dim() == 4:
        impl = _per_channel_module(impl)
    if sp_group is not None:
        from lasp_hf.parallel import lasp

        return lasp.sp_linear_attention(
            q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, sp_group=sp_group, sp_mode=sp_mode, local_impl=impl,
        )
    return impl.chunk_linear_attention(
        q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def linear_attention_step(q, k, v, g=None, *, state=None, scale=None, backend="auto", inplace=False):
    """One decoding token of `linear_attention`: S = exp(g) * S + k^T v, o = scale * q S.

    Args:
        q, k: [B, H, K]. v: [B, H, V]. g: None, [H], [B, H] or [B, H, K] (per key channel: S =
        diag(exp(g)) S + k^T v). state: None or float32
        [B, H, K, V] (the state after the previous token). scale: defaults to K ** -0.5.
        inplace: write the new state into `state` (float32, contiguous) and return it, instead of a new tensor
            (a decoding loop with a fixed state buffer, such as a CUDA graph, saves a copy per layer and step).
    Returns:
        o: [B, H, V] in v's dtype; the new float32 state [B, H, K, V].
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"linear_attention_step takes q, k [B, H, K] and v [B, H, V], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    B, H, K = q.shape
    if B < 1 or H < 1 or K < 1 or v.shape[-1] < 1:
        raise ValueError(
            f"q, k, v need at least one batch row, head and feature: got B = {B}, H = {H}, K = {K}, V = {v.shape[-1]}"
        )
    if g is not None:
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise ValueError("g must be None or a floating-point tensor of log-decays (<= 0)")
        if g.shape not in (torch.Size([H]), torch.Size([B, H]), torch.Size([B, H, K])):
            raise ValueError(f"g must be None, [H] = [{H}], [B, H] = {[B, H]} or [B, H, K] = {[B, H, K]}, "
                             f"got {list(g.shape)}")
        check_decay(g)
    if state is not None and tuple(state.shape) != (B, H, K, v.shape[-1]):
        raise ValueError(f"state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, got {tuple(state.shape)}")
    if inplace and (state is None or state.dtype != torch.float32 or not state.is_contiguous()):
        raise ValueError(
            "inplace=True writes the new state into `state`, which must then be a contiguous float32 tensor, got "
            + ("None" if state is None else f"{state.dtype}, contiguous={state.is_contiguous()}")
        )
    scale = float(K ** -0.5 if scale is None else scale)
    impl = _backend_module(_fit_backend(resolve_backend(backend, q.device), backend, K, v.shape[-1]))
    if not hasattr(impl, "recurrent_step"):
        impl = reference
    if impl is reference and g is not None and g.dim() == 3:
        impl = reference_gla
    return impl.recurrent_step(q, k, v, g, scale=scale, state=state, inplace=inplace)
