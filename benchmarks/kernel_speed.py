"""Kernel benchmark (issue 3): lasp_hf.linear_attention against its peers on one card, one process.

    python benchmarks/kernel_speed.py                       # every case -> benchmarks/results/kernels-<card>.json
    python benchmarks/kernel_speed.py --cases 'chunk-B1-*'  # a subset (glob on case names; --dry-run lists them)
    python benchmarks/kernel_speed.py --cpu --tiny          # smoke test of the harness, PyTorch backend

Shapes: B batch, T tokens, H heads, K = V = 128 head dims, bf16 inputs, scale 1.0, decay g_h =
-2^(-8(h+1)/H) (TransNormerLLM's slopes) as a tensor [H] ("head"), a per-token decay [B, T, H]
("token", secondary), or a decay per key channel [B, T, H, K] ("channel": GLA, `--decays channel`). Providers:
    lasp_hf   lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend="triton")    [B, T, H, D]
    fla       fla.ops.simple_gla.chunk_simple_gla (g_gamma=g, or g=g per token)     [B, T, H, D]
              fla.ops.gla.chunk_gla (g per key channel)
    lasp-ref  lasp.lightning_attn(q, k, v, s) with s = -g as [H, 1, 1]              [B, H, T, D]
    sdpa      causal softmax attention, flash backend (a yardstick, not the same function)
Every provider is first checked at the case's shape against a float64 run (o and every gradient;
bf16 tolerance 2e-2); a row that fails is marked FAILED and gets no ratio. Beside each row: the
memory-bound floor (bytes that must move / measured copy bandwidth) and the time ratio to fla.
"""

from __future__ import annotations

import gc
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import KI, Column

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
SDPA_CHECK_ROWS = 128  # query rows of SDPA checked against float64 (the last ones: they see every key)

CASES = common.Registry()


# ----------------------------------------------------------------------------- run settings


@dataclass
class Run:
    device: torch.device
    dtype: torch.dtype
    backend: str
    tiny: bool
    bandwidth_gbps: float
    warmup_ms: float = 25
    rep_ms: float = 100
    seed: int = 0
    providers: tuple = ()  # names to run (empty: all)
    decays: tuple = ("head", "token")  # decay kinds of the chunk cases

    def wants(self, provider: str) -> bool:
        return not self.providers or provider in self.providers

    def shape(self, B: int, T: int, H: int, D: int) -> tuple[int, int, int, int]:
        """The case's shape, or a small stand-in with --tiny (odd T, so padding paths run)."""
        if not self.tiny:
            return B, T, H, D
        return min(B, 2), min(T // 64 + 3, 131), min(H, 2), 32

    def time_ms(self, fn: Callable[[], object]) -> float:
        return common.bench_ms(fn, self.device, self.warmup_ms, self.rep_ms)

    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]


def slopes(H: int) -> torch.Tensor:
    """TransNormerLLM / lightning-attention decay rates per head (positive): 2^(-8(h+1)/H)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32)


# ----------------------------------------------------------------------------- float64 references


def reference_float64(q, k, v, g, scale: float, chunk: int = 64) -> torch.Tensor:
    """o of linear attention with decay, in float64, chunked (autograd gives the gradients).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log-decays. Per row and head:
    S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t, computed C tokens at a time.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk
    N = math.ceil(T / C)
    pad = N * C - T
    qf, kf, vf = (F.pad(x.double().transpose(1, 2), (0, 0, 0, pad)) for x in (q, k, v))
    gf = F.pad(g.double().transpose(1, 2), (0, pad))
    qc, kc, vc = qf.view(B, H, N, C, K), kf.view(B, H, N, C, K), vf.view(B, H, N, C, V)
    b = gf.view(B, H, N, C).cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    o = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
    b_end = b[..., -1:]
    chunk_states = (kc * (b_end - b).exp()[..., None]).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    state = q.new_zeros(B, H, K, V, dtype=torch.float64)
    before = []
    for n in range(N):
        before.append(state)
        state = b_end[:, :, n].exp()[..., None] * state + chunk_states[:, :, n]
    o = o + (qc * b.exp()[..., None]) @ torch.stack(before, dim=2)
    return (scale * o).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)


def reference_gla_float64(q, k, v, g, scale: float, chunk: int = 32) -> torch.Tensor:
    """o of linear attention with a decay per key channel (g [B, T, H, K]: S_t = diag(exp(g_t)) S_{t-1} +
    k_t^T v_t), in float64, C tokens at a time; inside a chunk the decays exp(b_i - b_j) are formed per channel."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g = (x.double().transpose(1, 2) for x in (q, k, v, g))
    state = q.new_zeros(B, H, K, V)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    outs = []
    for a in range(0, T, chunk):
        e = min(a + chunk, T)
        b = g[:, :, a:e].cumsum(2)
        decay = (b[:, :, :, None] - b[:, :, None]).masked_fill(~causal[: e - a, : e - a, None], float("-inf")).exp()
        attn = torch.einsum("bhik,bhjk,bhijk->bhij", q[:, :, a:e], k[:, :, a:e], decay)
        outs.append(scale * (attn @ v[:, :, a:e] + (q[:, :, a:e] * b.exp()) @ state))
        k_end = k[:, :, a:e] * (b[:, :, -1:] - b).exp()
        state = b[:, :, -1, :, None].exp() * state + k_end.transpose(-1, -2) @ v[:, :, a:e]
    return torch.cat(outs, 2).transpose(1, 2)


def reference_grads_float64(q, k, v, g, do, scale: float, grad_g: bool, heads: int = 8,
                            reference: Callable = reference_float64) -> dict:
    """o, dq, dk, dv (and dg) of `reference` (`reference_float64`), one batch row and `heads` heads at a time
    to bound memory (rows and heads are independent)."""
    B, _, H, _ = q.shape
    out = {name: [] for name in ("o", "dq", "dk", "dv", "dg")}
    for b in range(B):
        per_head = {name: [] for name in out}
        for h0 in range(0, H, heads):
            sl = (slice(b, b + 1), slice(None), slice(h0, h0 + heads))
            leaves = [x[sl].double().requires_grad_() for x in (q, k, v)]
            g_part = g[sl].double().requires_grad_(grad_g)
            o = reference(*leaves, g_part, scale)
            grads = torch.autograd.grad(o, leaves + ([g_part] if grad_g else []), do[sl].double())
            for name, value in zip(("o", "dq", "dk", "dv", "dg"), (o.detach(),) + grads):
                per_head[name].append(value)
        for name, parts in per_head.items():
            if parts:
                out[name].append(torch.cat(parts, dim=2))
    return {name: torch.cat(parts, dim=0) for name, parts in out.items() if parts}


def sdpa_rows_float64(q, k, v, do, rows: int) -> dict:
    """Causal softmax attention's o and dq for the last `rows` queries, in float64.
    q, k, v, do: [B, H, T, D]. Row i of o and dq needs only query i, every key, and do_i."""
    T, D = q.shape[2], q.shape[3]
    first = T - rows
    qs = q[:, :, first:].double().requires_grad_()
    scores = (qs @ k.double().transpose(-1, -2)) * D**-0.5
    query_pos = torch.arange(first, T, device=q.device)[:, None]
    scores = scores.masked_fill(torch.arange(T, device=q.device)[None, :] > query_pos, float("-inf"))
    o = scores.softmax(-1) @ v.double()
    (dq,) = torch.autograd.grad(o, qs, do[:, :, first:].double())
    return {"o": o.detach(), "dq": dq}


# ----------------------------------------------------------------------------- providers


@dataclass
class Inputs:
    q: torch.Tensor  # [B, T, H, K]
    k: torch.Tensor  # [B, T, H, K]
    v: torch.Tensor  # [B, T, H, V]
    g: torch.Tensor  # float32 [H] ("head"), [B, T, H] ("token") or [B, T, H, K] ("channel"), <= 0
    do: torch.Tensor  # [B, T, H, V]
    decay: str


@dataclass
class Prepared:
    """One provider ready to run: `forward()` returns o in the provider's layout; gradients
    flow to `leaves`; `to_bthd` brings a tensor of that layout back to [B, T, H, D]."""

    forward: Callable[[], torch.Tensor]
    leaves: list
    do: torch.Tensor
    to_bthd: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    grad_names: tuple = ("dq", "dk", "dv")
    note: str = ""


def _leaves(*tensors):
    return [x.detach().clone().requires_grad_() for x in tensors]


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def prepare_lasp_hf(run: Run, x: Inputs) -> Prepared:
    import lasp_hf

    q, k, v = _leaves(x.q, x.k, x.v)
    gated = x.decay in ("token", "channel")
    g = x.g.detach().clone().requires_grad_(gated)
    leaves = [q, k, v] + ([g] if gated else [])

    def forward():
        return lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend=run.backend)[0]

    names = ("dq", "dk", "dv") + (("dg",) if gated else ())
    return Prepared(forward, leaves, x.do, grad_names=names, note=f"backend={run.backend}")


def prepare_fla(run: Run, x: Inputs) -> Prepared:
    from fla.ops.simple_gla import chunk_simple_gla

    q, k, v = _leaves(x.q, x.k, x.v)
    if x.decay == "head":

        def forward():
            return chunk_simple_gla(q, k, v, g_gamma=x.g, scale=1.0)[0]

        return Prepared(forward, [q, k, v], x.do)
    g = x.g.detach().clone().requires_grad_()
    if x.decay == "channel":
        from fla.ops.gla import chunk_gla

        def forward():
            return chunk_gla(q, k, v, g, scale=1.0)[0]

        return Prepared(forward, [q, k, v, g], x.do, grad_names=("dq", "dk", "dv", "dg"), note="chunk_gla")

    def forward():
        return chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]

    return Prepared(forward, [q, k, v, g], x.do, grad_names=("dq", "dk", "dv", "dg"))


def prepare_lasp_ref(run: Run, x: Inputs) -> Prepared:
    from lasp import lightning_attn

    q, k, v = _leaves(_bhtd(x.q), _bhtd(x.k), _bhtd(x.v))
    s = (-x.g).view(-1, 1, 1).contiguous()  # positive rates: exp(-s) per token

    def forward():
        return lightning_attn(q, k, v, s)

    return Prepared(forward, [q, k, v], _bhtd(x.do), to_bthd=lambda t: t.transpose(1, 2))


def prepare_sdpa(run: Run, x: Inputs) -> Prepared:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _leaves(_bhtd(x.q), _bhtd(x.k), _bhtd(x.v))
    backends = [SDPBackend.FLASH_ATTENTION] if run.device.type == "cuda" else [SDPBackend.MATH]

    def forward():
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return Prepared(
        forward,
        [q, k, v],
        _bhtd(x.do),
        to_bthd=lambda t: t.transpose(1, 2),
        note="causal softmax (flash)" if run.device.type == "cuda" else "causal softmax (math)",
    )


def _needs(module: str, cuda: bool = True) -> Callable[[Run], str | None]:
    """None when `module` imports (and the run is on CUDA, if `cuda`), else why the row is skipped."""

    def check(run: Run) -> str | None:
        if cuda and run.device.type != "cuda":
            return f"{module} needs CUDA"
        try:
            __import__(module)
        except Exception as err:  # noqa: BLE001 - a broken peer install is skipped, not fatal
            return f"{module} unavailable ({type(err).__name__}: {err})"[:160]
        return None

    return check


@dataclass
class Provider:
    name: str
    prepare: Callable[[Run, Inputs], Prepared]
    decays: tuple
    unavailable: Callable[[Run], str | None] = field(default=lambda run: None)


PROVIDERS = [
    Provider("lasp_hf", prepare_lasp_hf, ("head", "token", "channel")),
    Provider("fla", prepare_fla, ("head", "token", "channel"), _needs("fla.ops.simple_gla")),
    Provider("lasp-ref", prepare_lasp_ref, ("head",), _needs("lasp")),
    Provider("sdpa", prepare_sdpa, ("head",), _needs("torch.nn.attention", cuda=False)),
]


# ----------------------------------------------------------------------------- the checks


def check_chunk(run: Run, provider: str, prepared: Prepared, ref: dict, sdpa_ref: dict | None) -> dict:
    """Relative errors of o and the gradients against float64; `sdpa_ref` for softmax attention."""
    o = prepared.forward()
    grads = torch.autograd.grad(o, prepared.leaves, prepared.do)
    if provider == "sdpa":
        rows = sdpa_ref["o"].shape[2]
        return {
            "o": common.relative_error(o[:, :, -rows:], sdpa_ref["o"]),
            "dq": common.relative_error(grads[0][:, :, -rows:], sdpa_ref["dq"]),
        }
    errors = {"o": common.relative_error(prepared.to_bthd(o), ref["o"])}
    for name, grad in zip(prepared.grad_names, grads):
        errors[name] = common.relative_error(grad if name == "dg" else prepared.to_bthd(grad), ref[name])
    return errors


def chunk_bytes(B: int, T: int, H: int, K: int, V: int, element: int, token_decay: bool,
                channel_decay: bool = False) -> dict:
    """Bytes that must move. Forward: read q, k, v, write o. Backward: read q, k, v, do, write
    dq, dk, dv. A per-token decay adds g (read) and dg (write), float32 (K of each with channel_decay)."""
    tokens = B * T * H
    g_bytes = tokens * 4 * (K if channel_decay else 1) if token_decay else 0
    fwd = tokens * (2 * K + 2 * V) * element + g_bytes
    bwd = tokens * ((2 * K + 2 * V) + (2 * K + V)) * element + 2 * g_bytes
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}


def _rows_without_timing(name, modes, decay, provider, shape, floors, status, err) -> list[dict]:
    """One untimed row per mode for a provider that was skipped or broke at this shape."""
    return [_row(name, mode, decay, provider, shape, status=status, note=_error_note(err), floor_ms=floors[mode])
            for mode in modes]


def _row(case: str, mode: str, decay: str, provider: str, shape: dict, **fields) -> dict:
    return {"case": case, "mode": mode, "decay": decay, "provider": provider, **shape, **fields}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_note(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:160]


# ----------------------------------------------------------------------------- cases


@CASES.case(
    "chunk",
    dict(B=1, H=16, T=4 * KI),
    dict(B=1, H=16, T=8 * KI),
    dict(B=1, H=16, T=32 * KI),
    dict(B=1, H=16, T=128 * KI),
    dict(B=8, H=32, T=4 * KI),
    dict(B=8, H=32, T=16 * KI),
)
def chunk(run: Run, name: str, B: int, H: int, T: int) -> list[dict]:
    """Forward and forward+backward of the chunked op, every provider, both decay kinds."""
    B, T, H, D = run.shape(B, T, H, 128)
    shape = dict(B=B, T=T, H=H, K=D, V=D)
    rows = []
    for decay in run.decays:
        gen = torch.Generator(device=run.device).manual_seed(run.seed)
        q, k, v, do = (
            torch.randn(B, T, H, D, device=run.device, dtype=run.dtype, generator=gen) for _ in range(4)
        )
        reference = {}
        if decay == "head":
            g = -slopes(H).to(run.device)
            g_full = g.view(1, 1, H).expand(B, T, H)
        elif decay == "channel":
            # GLA's gates (fla's tests): log-sigmoid of a normal, damped by 16, per key channel
            g = F.logsigmoid(torch.randn(B, T, H, D, device=run.device, generator=gen)) / 16
            g_full = g
            reference = dict(heads=1, reference=reference_gla_float64)
        else:
            # gated-model decays, as in fla's tests: log-sigmoid of a normal, damped by 16
            g = F.logsigmoid(torch.randn(B, T, H, device=run.device, generator=gen)) / 16
            g_full = g
        inputs = Inputs(q, k, v, g, do, decay)
        # Computed in float64, kept in float32 (its rounding, ~1e-7, is far below bf16's ~1e-3).
        ref = {
            key: value.float()
            for key, value in reference_grads_float64(
                q, k, v, g_full, do, 1.0, grad_g=decay != "head", **reference
            ).items()
        }
        sdpa_ref = None
        if decay == "head":
            rows_checked = min(SDPA_CHECK_ROWS, T)
            sdpa_ref = sdpa_rows_float64(_bhtd(q), _bhtd(k), _bhtd(v), _bhtd(do), rows_checked)
        nbytes = chunk_bytes(B, T, H, D, D, q.element_size(), decay != "head", decay == "channel")
        for provider in PROVIDERS:
            if decay not in provider.decays or not run.wants(provider.name):
                continue
            print(f"[kernels] {name} {decay}: {provider.name}", file=sys.stderr, flush=True)
            rows += _run_chunk_provider(run, name, decay, provider, inputs, ref, sdpa_ref, nbytes, shape)
            _free(run.device)  # what the provider allocated is garbage once it returns
        del ref, sdpa_ref, inputs, q, k, v, do, g, g_full
        _free(run.device)
    _add_ratios(rows)
    return rows


def _run_chunk_provider(run, name, decay, provider, inputs, ref, sdpa_ref, nbytes, shape) -> list[dict]:
    modes = ("fwd", "fwd+bwd")
    floors = {mode: common.floor_ms(nbytes[mode], run.bandwidth_gbps) for mode in modes}
    reason = provider.unavailable(run)
    if reason:
        return [
            _row(name, mode, decay, provider.name, shape, status="SKIP", note=reason, floor_ms=floors[mode])
            for mode in modes
        ]
    try:
        prepared = provider.prepare(run, inputs)
        errors = check_chunk(run, provider.name, prepared, ref, sdpa_ref)
    except NotImplementedError as err:
        return _rows_without_timing(name, modes, decay, provider.name, shape, floors, "SKIP", err)
    except Exception as err:  # noqa: BLE001 - one broken provider must not stop the others
        traceback.print_exc()
        _free(run.device)
        return _rows_without_timing(name, modes, decay, provider.name, shape, floors, "ERROR", err)
    err = max(errors.values())
    status = "ok" if err <= run.tolerance() else "FAILED"
    note = prepared.note + (
        f"; checked: last {sdpa_ref['o'].shape[2]} query rows (o, dq)" if provider.name == "sdpa" else ""
    )
    rows = []
    steps = {
        "fwd": prepared.forward,
        "fwd+bwd": lambda: torch.autograd.grad(prepared.forward(), prepared.leaves, prepared.do),
    }
    for mode in modes:
        row = _row(
            name,
            mode,
            decay,
            provider.name,
            shape,
            err=err,
            errors=errors,
            status=status,
            note=note,
            floor_ms=floors[mode],
        )
        try:
            row["ms"] = run.time_ms(steps[mode])
            row["x_floor"] = row["ms"] / floors[mode]
        except Exception as exc:  # noqa: BLE001
            row.update(status="ERROR", note=_error_note(exc))
            _free(run.device)
        rows.append(row)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """t/fla: a row's time over fla's at the same case, decay and mode; only when both passed."""
    fla = {(r["case"], r["decay"], r["mode"]): r for r in rows if r["provider"] == "fla"}
    for row in rows:
        peer = fla.get((row["case"], row["decay"], row["mode"]))
        if peer and row["status"] == "ok" and peer["status"] == "ok" and row.get("ms") and peer.get("ms"):
            row["t_vs_fla"] = row["ms"] / peer["ms"]


@CASES.case("decode", dict(B=1, H=16), dict(B=64, H=16))
def decode(run: Run, name: str, B: int, H: int) -> list[dict]:
    """One decoding token: S = exp(g) S + k^T v, o = q S, with a float32 state [B, H, K, V]."""
    B, _, H, D = run.shape(B, 64, H, 128)
    shape = dict(B=B, T=1, H=H, K=D, V=D)
    gen = torch.Generator(device=run.device).manual_seed(run.seed)
    q, k, v = (torch.randn(B, H, D, device=run.device, dtype=run.dtype, generator=gen) for _ in range(3))
    state = torch.randn(B, H, D, D, device=run.device, generator=gen)
    g = -slopes(H).to(run.device)
    kv = k.double()[..., :, None] * v.double()[..., None, :]
    new_state_ref = g.double().exp()[None, :, None, None] * state.double() + kv
    o_ref = (q.double()[..., None, :] @ new_state_ref).squeeze(-2)
    element = q.element_size()
    nbytes = 2 * state.numel() * 4 + B * H * (2 * D + 2 * D) * element
    floor = common.floor_ms(nbytes, run.bandwidth_gbps)

    import lasp_hf

    def ours():
        return lasp_hf.linear_attention_step(q, k, v, g, state=state, scale=1.0, backend=run.backend)

    fla_missing = _needs("fla.ops.simple_gla")(run)
    if not fla_missing:
        from fla.ops.simple_gla import fused_recurrent_simple_gla

    def fla():
        o, new_state = fused_recurrent_simple_gla(
            q[:, None],
            k[:, None],
            v[:, None],
            g_gamma=g,
            scale=1.0,
            initial_state=state,
            output_final_state=True,
        )
        return o[:, 0], new_state

    candidates = [("lasp_hf", ours, None), ("fla", fla, fla_missing)]
    rows = []
    for provider, step, reason in candidates:
        if not run.wants(provider):
            continue
        print(f"[kernels] {name}: {provider}", file=sys.stderr, flush=True)
        row = _row(name, "decode", "head", provider, shape, floor_ms=floor)
        if provider == "lasp_hf":
            row["note"] = f"backend={run.backend}" + _decode_fallback_note(run)
        if reason:
            row.update(status="SKIP", note=reason)
            rows.append(row)
            continue
        try:
            o, new_state = step()
            errors = {
                "o": common.relative_error(o, o_ref),
                "state": common.relative_error(new_state, new_state_ref),
            }
            row.update(err=max(errors.values()), errors=errors)
            row["status"] = "ok" if row["err"] <= run.tolerance() else "FAILED"
            row["ms"] = run.time_ms(step)
            row["us"] = row["ms"] * 1e3
            row["x_floor"] = row["ms"] / floor
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            row.update(status="ERROR", note=_error_note(err))
        rows.append(row)
    _add_ratios(rows)
    return rows


def _decode_fallback_note(run: Run) -> str:
    if run.backend != "triton":
        return ""
    try:
        from lasp_hf.kernels import triton as triton_kernels
    except ImportError:
        return " (Triton kernels missing)"
    return "" if hasattr(triton_kernels, "recurrent_step") else " (no Triton step yet: PyTorch fallback)"


# ----------------------------------------------------------------------------- main

CHUNK_COLUMNS = [
    Column("case", "case"),
    Column("decay", "g"),
    Column("mode", "mode"),
    Column("provider", "provider"),
    Column("ms", "ms", "{:.3f}"),
    Column("floor_ms", "floor ms", "{:.3f}"),
    Column("x_floor", "x floor", "{:.1f}"),
    Column("t_vs_fla", "t/fla", "{:.2f}x"),
    Column("err", "rel err", "{:.2e}"),
    Column("status", "status"),
]
DECODE_COLUMNS = [
    Column("case", "case"),
    Column("provider", "provider"),
    Column("us", "us", "{:.1f}"),
    Column("floor_ms", "floor ms", "{:.4f}"),
    Column("x_floor", "x floor", "{:.1f}"),
    Column("t_vs_fla", "t/fla", "{:.2f}x"),
    Column("err", "rel err", "{:.2e}"),
    Column("status", "status"),
]
RESULT_COLUMNS = CHUNK_COLUMNS[:4] + [Column("us", "us", "{:.1f}")] + CHUNK_COLUMNS[4:]


def parse_args(argv=None):
    parser = common.common_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        default=None,
        choices=("triton", "torch", "auto"),
        help="lasp_hf backend (default: triton on CUDA, torch with --cpu)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument(
        "--providers",
        default=",".join(PROVIDER_NAMES),
        help=f"comma-separated subset of {','.join(PROVIDER_NAMES)} (default: all); "
        "e.g. --providers ours to time our op alone",
    )
    parser.add_argument("--decays", default="head,token",
                        help="decay kinds of the chunk cases: head (g [H], the targets' case), token (g [B, T, H]), "
                        "channel (g [B, T, H, K], GLA; fla's peer is chunk_gla)")
    args = parser.parse_args(argv)
    if not set(args.decays.split(",")) <= {"head", "token", "channel"} or not args.decays:
        raise ValueError(f"--decays takes head, token and/or channel, comma-separated; got {args.decays!r}")
    args.providers = parse_providers(args.providers)
    return args


PROVIDER_NAMES = ("ours", "fla", "lasp", "sdpa")  # --providers spelling -> PROVIDERS' names below
_PROVIDER_ALIASES = {
    "ours": "lasp_hf",
    "lasp_hf": "lasp_hf",
    "fla": "fla",
    "lasp": "lasp-ref",
    "lasp-ref": "lasp-ref",
    "sdpa": "sdpa",
}


def parse_providers(text: str) -> tuple:
    """Turn "ours,fla" into ("lasp_hf", "fla"); ValueError on an unknown name or an empty list."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in _PROVIDER_ALIASES]
    if unknown or not names:
        raise ValueError(
            f"--providers {text!r}: expected a comma-separated subset of {', '.join(PROVIDER_NAMES)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return tuple(dict.fromkeys(_PROVIDER_ALIASES[name] for name in names))


def main(argv=None) -> int:
    args = parse_args(argv)
    selected = CASES.select(args.cases)
    if args.dry_run:
        for case in selected:
            print(case.name, case.params)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("kernel_speed.py: no CUDA device; pass --cpu (with --tiny) for a smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    backend = args.backend or ("torch" if args.cpu else "triton")
    env = common.environment(device)
    bandwidth = common.copy_bandwidth_gbps(device, nbytes=(16 << 20) if args.cpu or args.tiny else 1 << 30)
    run = Run(
        device,
        getattr(torch, args.dtype),
        backend,
        args.tiny,
        bandwidth,
        args.warmup_ms,
        args.rep_ms,
        providers=args.providers,
        decays=tuple(args.decays.split(",")),
    )
    print(common.describe_env(env))
    print(
        f"copy bandwidth {bandwidth:.0f} GB/s; lasp_hf backend {backend}; dtype {args.dtype}; "
        f"providers {', '.join(args.providers)}",
        flush=True,
    )
    rows = []
    for case in selected:
        print(f"[kernels] {case.name}", file=sys.stderr, flush=True)
        rows += case(run, case.name)
    chunk_rows = [r for r in rows if r["mode"] != "decode"]
    decode_rows = [r for r in rows if r["mode"] == "decode"]
    if chunk_rows:
        common.print_table(
            f"linear attention, {args.dtype}, {env['card']} (t/fla < 1: faster than fla)",
            chunk_rows,
            CHUNK_COLUMNS,
        )
    if decode_rows:
        common.print_table(f"decode step, {env['card']}", decode_rows, DECODE_COLUMNS)
    for row in rows:
        if row["status"] != "ok":
            where = f"{row['case']} {row['decay']} {row['mode']} {row['provider']}"
            print(f"  {where}: {row['status']} {row.get('note', '')}")
    name = f"kernels-{common.card_slug(env['card'])}" + ("-tiny" if args.tiny else "")
    path = common.write_results(
        name,
        env,
        rows,
        RESULT_COLUMNS,
        args.out,
        extra={
            "copy_bandwidth_gbps": bandwidth,
            "dtype": args.dtype,
            "backend": backend,
            "tolerance": run.tolerance(),
            "args": vars(args),
        },
        notes=[
            f"copy bandwidth {bandwidth:.0f} GB/s; floor = bytes that must move / that bandwidth",
            "t/fla: time over fla's at the same shape and mode (< 1 is faster); only for rows that passed",
            (
                f"rel err: max over o and gradients of ||x - ref|| / ||ref|| against float64; "
                f"tolerance {run.tolerance():g}"
            ),
        ],
    )
    print(f"\nwrote {path}")
    failed = [r for r in rows if r["status"] in ("FAILED", "ERROR")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
