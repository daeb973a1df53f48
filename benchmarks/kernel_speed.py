"""Kernel speed: lasp_hf.linear_attention against its peers on one card, in one process.

    python benchmarks/kernel_speed.py                       # every case -> benchmarks/results/kernels-<card>.json
    python benchmarks/kernel_speed.py --cases 'chunk-B1-*'  # a subset (glob on case names; --dry-run lists them)
    python benchmarks/kernel_speed.py --cpu --tiny          # smoke test of the harness, PyTorch backend

B batch, T tokens, H heads, K = V = 128, bf16, scale 1.0, g [H] = TransNormerLLM's slopes ("head"), [B, T, H]
("token") or [B, T, H, K] ("channel": GLA's gates, `--decays channel`; fla's peer is then chunk_gla).
Providers (PROVIDERS): lasp_hf (backend "triton"), fla's chunk_simple_gla, the LASP reference's
lightning_attn ([B, H, T, D]), SDPA flash (softmax: a yardstick, not the same function). Every provider is first
checked against float64 (o and every gradient); a row that fails is FAILED and gets no ratio. Beside each row: the
memory-bound floor (bytes that must move / measured copy bandwidth) and the time over fla's.
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
from common import KI, TOLERANCE, Column, slopes
from common import leaves as _leaves

SDPA_CHECK_ROWS = 128  # query rows of SDPA checked against float64 (the last ones: they see every key)
CASES = common.Registry()


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
        return (B, T, H, D) if not self.tiny else (min(B, 2), min(T // 64 + 3, 131), min(H, 2), 32)

    def time_ms(self, fn: Callable[[], object]) -> float:
        return common.bench_ms(fn, self.device, self.warmup_ms, self.rep_ms)


def copy_bandwidth_gbps(device: torch.device, nbytes: int) -> float:
    """GB/s (1e9) of a device-to-device copy of `nbytes`, read plus written bytes over its median time."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (common.bench_ms(lambda: dst.copy_(src), device) * 1e-3) / 1e9


def chunk_bytes(B: int, T: int, H: int, K: int, V: int, element: int, token_decay: bool,
                channel_decay: bool = False) -> dict:
    """Bytes that must move. Forward: read q, k, v, write o. Backward: read q, k, v, do, write dq, dk, dv.
    A per-token decay adds g (read) and dg (write), float32 (K of each with channel_decay)."""
    tokens = B * T * H
    g_bytes = tokens * 4 * (K if channel_decay else 1) if token_decay else 0
    fwd = tokens * (2 * K + 2 * V) * element + g_bytes
    return {"fwd": fwd, "fwd+bwd": 2 * fwd + tokens * (2 * K + V) * element + g_bytes}


# ----------------------------------------------------------------------------- float64 references


def reference_float64(q, k, v, g, scale: float, chunk: int = 64) -> torch.Tensor:
    """o of linear attention with decay in float64, C tokens at a time (autograd gives the gradients).
    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H]. Per row and head: S_t = exp(g_t) S_{t-1} + k_t^T v_t,
    o_t = scale * q_t S_t."""
    B, T, H, K = q.shape
    V, C = v.shape[-1], chunk
    N = math.ceil(T / C)
    qc, kc, vc = (F.pad(x.double().transpose(1, 2), (0, 0, 0, N * C - T)).view(B, H, N, C, -1) for x in (q, k, v))
    b = F.pad(g.double().transpose(1, 2), (0, N * C - T)).view(B, H, N, C).cumsum(-1)  # decay since chunk start
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    o = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
    b_end = b[..., -1:]
    chunk_states = (kc * (b_end - b).exp()[..., None]).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    state, before = q.new_zeros(B, H, K, V, dtype=torch.float64), []
    for n in range(N):
        before.append(state)
        state = b_end[:, :, n].exp()[..., None] * state + chunk_states[:, :, n]
    o = o + (qc * b.exp()[..., None]) @ torch.stack(before, dim=2)
    return (scale * o).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)


def reference_gla_float64(q, k, v, g, scale: float, chunk: int = 32) -> torch.Tensor:
    """o of linear attention with a decay per key channel (g [B, T, H, K]: S_t = diag(exp(g_t)) S_{t-1} +
    k_t^T v_t) in float64, C tokens at a time; inside a chunk the decays exp(b_i - b_j) are formed per channel."""
    B, T, H, K = q.shape
    q, k, v, g = (x.double().transpose(1, 2) for x in (q, k, v, g))
    state, outs = q.new_zeros(B, H, K, v.shape[-1]), []
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    for a in range(0, T, chunk):
        e = min(a + chunk, T)
        b = g[:, :, a:e].cumsum(2)
        decay = (b[:, :, :, None] - b[:, :, None]).masked_fill(~causal[:e - a, :e - a, None], float("-inf")).exp()
        attn = torch.einsum("bhik,bhjk,bhijk->bhij", q[:, :, a:e], k[:, :, a:e], decay)
        outs.append(scale * (attn @ v[:, :, a:e] + (q[:, :, a:e] * b.exp()) @ state))
        state = b[:, :, -1, :, None].exp() * state + (k[:, :, a:e] * (b[:, :, -1:] - b).exp()).transpose(-1, -2) @ v[:, :, a:e]
    return torch.cat(outs, 2).transpose(1, 2)


def reference_grads_float64(q, k, v, g, do, scale: float, grad_g: bool, heads: int = 8,
                            reference: Callable = reference_float64) -> dict:
    """o, dq, dk, dv (and dg) of `reference` (`reference_float64`), one batch row and `heads` heads at a time
    (memory)."""
    names = ("o", "dq", "dk", "dv", "dg")
    out = {name: [] for name in names}
    for b in range(q.shape[0]):
        parts = {name: [] for name in names}
        for h0 in range(0, q.shape[2], heads):
            sl = (slice(b, b + 1), slice(None), slice(h0, h0 + heads))
            leaves = [x[sl].double().requires_grad_() for x in (q, k, v)]
            g_part = g[sl].double().requires_grad_(grad_g)
            o = reference(*leaves, g_part, scale)
            grads = torch.autograd.grad(o, leaves + ([g_part] if grad_g else []), do[sl].double())
            for name, value in zip(names, (o.detach(),) + grads):
                parts[name].append(value)
        for name in names:
            if parts[name]:
                out[name].append(torch.cat(parts[name], dim=2))
    return {name: torch.cat(values) for name, values in out.items() if values}


def sdpa_rows_float64(q, k, v, do, rows: int) -> dict:
    """Causal softmax attention's o and dq for the last `rows` queries, in float64; q, k, v, do: [B, H, T, D]."""
    T, D = q.shape[2], q.shape[3]
    qs = q[:, :, T - rows:].double().requires_grad_()
    scores = (qs @ k.double().transpose(-1, -2)) * D**-0.5
    future = torch.arange(T, device=q.device)[None, :] > torch.arange(T - rows, T, device=q.device)[:, None]
    o = scores.masked_fill(future, float("-inf")).softmax(-1) @ v.double()
    (dq,) = torch.autograd.grad(o, qs, do[:, :, T - rows:].double())
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
    """One provider ready to run: `forward()` returns o in the provider's layout, gradients flow to `leaves`,
    `to_bthd` brings a tensor of that layout back to [B, T, H, D]."""

    forward: Callable[[], torch.Tensor]
    leaves: list
    do: torch.Tensor
    to_bthd: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    grad_names: tuple = ("dq", "dk", "dv")


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def prepare_lasp_hf(run: Run, x: Inputs) -> Prepared:
    import lasp_hf

    q, k, v = _leaves(x.q, x.k, x.v)
    token = x.decay != "head"  # a decay per token (and channel) gets a gradient
    g = x.g.detach().clone().requires_grad_(token)

    def forward():
        return lasp_hf.linear_attention(q, k, v, g, scale=1.0, backend=run.backend)[0]

    return Prepared(forward, [q, k, v] + [g] * token, x.do, grad_names=("dq", "dk", "dv") + ("dg",) * token)


def prepare_fla(run: Run, x: Inputs) -> Prepared:
    from fla.ops.simple_gla import chunk_simple_gla

    q, k, v = _leaves(x.q, x.k, x.v)
    if x.decay == "head":
        return Prepared(lambda: chunk_simple_gla(q, k, v, g_gamma=x.g, scale=1.0)[0], [q, k, v], x.do)
    g = x.g.detach().clone().requires_grad_()
    if x.decay == "channel":
        from fla.ops.gla import chunk_gla

        return Prepared(lambda: chunk_gla(q, k, v, g, scale=1.0)[0], [q, k, v, g], x.do,
                        grad_names=("dq", "dk", "dv", "dg"))
    return Prepared(lambda: chunk_simple_gla(q, k, v, g=g, scale=1.0)[0], [q, k, v, g], x.do,
                    grad_names=("dq", "dk", "dv", "dg"))


def prepare_lasp_ref(run: Run, x: Inputs) -> Prepared:
    from lasp import lightning_attn

    q, k, v = _leaves(_bhtd(x.q), _bhtd(x.k), _bhtd(x.v))
    s = (-x.g).view(-1, 1, 1).contiguous()  # positive rates: exp(-s) per token
    return Prepared(lambda: lightning_attn(q, k, v, s), [q, k, v], _bhtd(x.do), to_bthd=lambda t: t.transpose(1, 2))


def prepare_sdpa(run: Run, x: Inputs) -> Prepared:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _leaves(_bhtd(x.q), _bhtd(x.k), _bhtd(x.v))
    cuda = run.device.type == "cuda"

    def forward():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION if cuda else SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return Prepared(forward, [q, k, v], _bhtd(x.do), to_bthd=lambda t: t.transpose(1, 2))


def _needs(module: str, cuda: bool = True) -> Callable[[Run], str | None]:
    """A provider's `unavailable`: None when `module` imports (on CUDA, if `cuda`), else why its rows are SKIP."""
    return lambda run: common.missing(module, run.device, cuda)


@dataclass
class Provider:
    name: str
    prepare: Callable[[Run, Inputs], Prepared]
    decays: tuple  # the decay kinds it runs
    unavailable: Callable[[Run], str | None] = field(default=lambda run: None)


PROVIDERS = [
    Provider("lasp_hf", prepare_lasp_hf, ("head", "token", "channel")),
    Provider("fla", prepare_fla, ("head", "token", "channel"), _needs("fla.ops.simple_gla")),
    Provider("lasp-ref", prepare_lasp_ref, ("head",), _needs("lasp")),
    Provider("sdpa", prepare_sdpa, ("head",), _needs("torch.nn.attention", cuda=False)),
]
PROVIDER_ALIASES = {"ours": "lasp_hf", "lasp_hf": "lasp_hf", "fla": "fla", "lasp": "lasp-ref", "lasp-ref": "lasp-ref",
                    "sdpa": "sdpa"}  # --providers spelling -> PROVIDERS' names
DECAYS = ("head", "token")  # the default kinds; "channel" (g [B, T, H, K]) on request
DECAY_CHOICES = DECAYS + ("channel",)


# ----------------------------------------------------------------------------- cases


def _row(case: str, mode: str, decay: str, provider: str, shape: dict, **fields) -> dict:
    return {"case": case, "mode": mode, "decay": decay, "provider": provider, **shape, **fields}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_note(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:160]


def _add_ratios(rows: list[dict]) -> None:
    """t/fla: a row's time over fla's at the same case, decay and mode; only when both passed."""
    fla = {(r["case"], r["decay"], r["mode"]): r for r in rows if r["provider"] == "fla"}
    for row in rows:
        peer = fla.get((row["case"], row["decay"], row["mode"]))
        if peer and row["status"] == peer["status"] == "ok" and row.get("ms") and peer.get("ms"):
            row["t_vs_fla"] = row["ms"] / peer["ms"]


@CASES.case("chunk", dict(B=1, H=16, T=4 * KI), dict(B=1, H=16, T=8 * KI), dict(B=1, H=16, T=32 * KI),
            dict(B=1, H=16, T=128 * KI), dict(B=8, H=32, T=4 * KI), dict(B=8, H=32, T=16 * KI))
def chunk(run: Run, name: str, B: int, H: int, T: int) -> list[dict]:
    """Forward and forward+backward of the chunked op, every provider, every selected decay kind."""
    B, T, H, D = run.shape(B, T, H, 128)
    shape = dict(B=B, T=T, H=H, K=D, V=D)
    rows = []
    for decay in run.decays:
        gen = torch.Generator(device=run.device).manual_seed(run.seed)
        q, k, v, do = (torch.randn(B, T, H, D, device=run.device, dtype=run.dtype, generator=gen) for _ in range(4))
        reference = {}
        if decay == "head":
            g = -slopes(H).to(run.device)
            g_full = g.view(1, 1, H).expand(B, T, H)
        elif decay == "channel":  # GLA's gates (fla's tests): log-sigmoid of a normal, damped by 16, per key channel
            g = g_full = F.logsigmoid(torch.randn(B, T, H, D, device=run.device, generator=gen)) / 16
            reference = dict(heads=1, reference=reference_gla_float64)
        else:  # gated-model decays, as in fla's tests: log-sigmoid of a normal, damped by 16
            g = g_full = F.logsigmoid(torch.randn(B, T, H, device=run.device, generator=gen)) / 16
        # Computed in float64, kept in float32 (its rounding, ~1e-7, is far below bf16's ~1e-3).
        print(f"[kernels] {name} {decay}: float64 reference", file=sys.stderr, flush=True)
        ref = {key: value.float() for key, value in
               reference_grads_float64(q, k, v, g_full, do, 1.0, grad_g=decay != "head", **reference).items()}
        sdpa_ref = sdpa_rows_float64(*map(_bhtd, (q, k, v, do)), min(SDPA_CHECK_ROWS, T)) if decay == "head" else None
        nbytes = chunk_bytes(B, T, H, D, D, q.element_size(), decay != "head", decay == "channel")
        floors = {mode: nbytes[mode] / (run.bandwidth_gbps * 1e9) * 1e3 for mode in nbytes}
        for provider in PROVIDERS:
            if decay in provider.decays and run.wants(provider.name):
                print(f"[kernels] {name} {decay}: {provider.name}", file=sys.stderr, flush=True)
                inputs = Inputs(q, k, v, g, do, decay)
                new_rows = _run_chunk_provider(run, name, decay, provider, inputs, ref, sdpa_ref, floors, shape)
                for row in new_rows:  # as they come, so that a run stopped part-way leaves its numbers
                    print(f"[kernels] {name} {decay} {row['mode']} {provider.name}: {row['status']} "
                          f"{row.get('ms', float('nan')):.3f} ms, err {row.get('err', float('nan')):.2e}",
                          file=sys.stderr, flush=True)
                rows += new_rows
                _free(run.device)  # what the provider allocated is garbage once it returns
        del ref, sdpa_ref, q, k, v, do, g, g_full
        _free(run.device)
    _add_ratios(rows)
    return rows


def check_chunk(provider: str, prepared: Prepared, ref: dict, sdpa_ref: dict | None) -> dict:
    """Relative errors of o and every gradient against float64 (softmax attention: its last rows' o and dq)."""
    o = prepared.forward()
    grads = torch.autograd.grad(o, prepared.leaves, prepared.do)
    if provider == "sdpa":
        rows = sdpa_ref["o"].shape[2]
        return {"o": common.relative_error(o[:, :, -rows:], sdpa_ref["o"]),
                "dq": common.relative_error(grads[0][:, :, -rows:], sdpa_ref["dq"])}
    errors = {"o": common.relative_error(prepared.to_bthd(o), ref["o"])}
    for grad_name, grad in zip(prepared.grad_names, grads):
        errors[grad_name] = common.relative_error(grad if grad_name == "dg" else prepared.to_bthd(grad), ref[grad_name])
    return errors


def _run_chunk_provider(run, name, decay, provider, inputs, ref, sdpa_ref, floors, shape) -> list[dict]:
    modes = ("fwd", "fwd+bwd")
    untimed = lambda status, note: [_row(name, m, decay, provider.name, shape, status=status, note=note,  # noqa: E731
                                         floor_ms=floors[m]) for m in modes]
    reason = provider.unavailable(run)
    if reason:
        return untimed("SKIP", reason)
    try:
        prepared = provider.prepare(run, inputs)
        errors = check_chunk(provider.name, prepared, ref, sdpa_ref)
    except NotImplementedError as err:
        return untimed("SKIP", _error_note(err))
    except Exception as err:  # noqa: BLE001 - one broken provider must not stop the others
        traceback.print_exc()
        return untimed("ERROR", _error_note(err))
    err = max(errors.values())
    status = "ok" if err <= TOLERANCE[run.dtype] else "FAILED"
    steps = {"fwd": prepared.forward,  # (timed with inputs that require grad: the training forward)
             "fwd+bwd": lambda: torch.autograd.grad(prepared.forward(), prepared.leaves, prepared.do)}
    rows = []
    for mode in modes:
        row = _row(name, mode, decay, provider.name, shape, err=err, errors=errors, status=status,
                   floor_ms=floors[mode])
        try:
            row["ms"] = run.time_ms(steps[mode])
            row["x_floor"] = row["ms"] / floors[mode]
        except Exception as exc:  # noqa: BLE001
            row.update(status="ERROR", note=_error_note(exc))
            _free(run.device)
        rows.append(row)
    return rows


@CASES.case("decode", dict(B=1, H=16), dict(B=64, H=16))
def decode(run: Run, name: str, B: int, H: int) -> list[dict]:
    """One decoding token: S = exp(g) S + k^T v, o = q S, with a float32 state [B, H, K, V]."""
    import lasp_hf

    B, _, H, D = run.shape(B, 64, H, 128)
    shape = dict(B=B, T=1, H=H, K=D, V=D)
    gen = torch.Generator(device=run.device).manual_seed(run.seed)
    q, k, v = (torch.randn(B, H, D, device=run.device, dtype=run.dtype, generator=gen) for _ in range(3))
    state = torch.randn(B, H, D, D, device=run.device, generator=gen)
    g = -slopes(H).to(run.device)
    kv = k.double()[..., None] * v.double()[..., None, :]
    state_ref = g.double().exp()[None, :, None, None] * state.double() + kv
    o_ref = (q.double()[..., None, :] @ state_ref).squeeze(-2)
    floor = (2 * state.numel() * 4 + B * H * 4 * D * q.element_size()) / (run.bandwidth_gbps * 1e9) * 1e3

    def ours():
        return lasp_hf.linear_attention_step(q, k, v, g, state=state, scale=1.0, backend=run.backend)

    def fla():
        from fla.ops.simple_gla import fused_recurrent_simple_gla

        o, new_state = fused_recurrent_simple_gla(q[:, None], k[:, None], v[:, None], g_gamma=g, scale=1.0,
                                                  initial_state=state, output_final_state=True)
        return o[:, 0], new_state

    rows = []
    for provider, step, reason in (("lasp_hf", ours, None), ("fla", fla, _needs("fla.ops.simple_gla")(run))):
        if not run.wants(provider):
            continue
        print(f"[kernels] {name}: {provider}", file=sys.stderr, flush=True)
        row = _row(name, "decode", "head", provider, shape, floor_ms=floor, status="SKIP", note=reason)
        if not reason:
            try:
                o, new_state = step()
                row["errors"] = {"o": common.relative_error(o, o_ref),
                                 "state": common.relative_error(new_state, state_ref)}
                row["err"] = max(row["errors"].values())
                row["status"] = "ok" if row["err"] <= TOLERANCE[run.dtype] else "FAILED"
                row["ms"] = run.time_ms(step)
                row.update(us=row["ms"] * 1e3, x_floor=row["ms"] / floor)
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                row.update(status="ERROR", note=_error_note(err))
        rows.append(row)
    _add_ratios(rows)
    return rows


# ----------------------------------------------------------------------------- main

COLUMNS = [Column("case", "case"), Column("decay", "g"), Column("mode", "mode"), Column("provider", "provider"),
           Column("us", "us", "{:.1f}"), Column("ms", "ms", "{:.3f}"), Column("floor_ms", "floor ms", "{:.3f}"),
           Column("x_floor", "x floor", "{:.1f}"), Column("t_vs_fla", "t/fla", "{:.2f}x"),
           Column("err", "rel err", "{:.2e}"), Column("status", "status")]


def parse_providers(text: str) -> tuple:
    """"ours,fla" -> ("lasp_hf", "fla"); ValueError on an unknown name or an empty list."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in PROVIDER_ALIASES]
    if unknown or not names:
        raise ValueError(f"--providers {text!r}: expected a comma-separated subset of ours, fla, lasp, sdpa"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return tuple(dict.fromkeys(PROVIDER_ALIASES[n] for n in names))


def parse_args(argv=None):
    parser = common.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, choices=("triton", "torch", "auto"),
                        help="lasp_hf backend (default: triton on CUDA, torch with --cpu)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--providers", default="ours,fla,lasp,sdpa",
                        help="comma-separated subset of ours,fla,lasp,sdpa (default: all)")
    parser.add_argument("--decays", default=",".join(DECAYS),
                        help="decay kinds of the chunk cases: head (g [H]), token (g [B, T, H]), channel "
                        "(g [B, T, H, K], GLA; fla's peer is chunk_gla)")
    args = parser.parse_args(argv)
    if not args.decays or not set(args.decays.split(",")) <= set(DECAY_CHOICES):
        raise ValueError(f"--decays takes {', '.join(DECAY_CHOICES)}, comma-separated; got {args.decays!r}")
    args.providers = parse_providers(args.providers)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    selected = CASES.select(args.cases)
    if args.dry_run:
        print("\n".join(f"{case.name} {case.params}" for case in selected))
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("kernel_speed.py: no CUDA device; pass --cpu (with --tiny) for a smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    backend = args.backend or ("torch" if args.cpu else "triton")
    env = common.environment(device)
    bandwidth = copy_bandwidth_gbps(device, (16 << 20) if args.cpu or args.tiny else 1 << 30)
    run = Run(device, getattr(torch, args.dtype), backend, args.tiny, bandwidth, args.warmup_ms, args.rep_ms,
              providers=args.providers, decays=tuple(args.decays.split(",")))
    print(f"{common.describe_env(env)}\ncopy bandwidth {bandwidth:.0f} GB/s; backend {backend}; {args.dtype}",
          flush=True)
    rows = []
    for case in selected:
        rows += case(run, case.name)
    print(f"\nlinear attention, {args.dtype}, {env['card']} (t/fla < 1: faster than fla)")
    print(common.format_table(rows, COLUMNS), flush=True)
    name = f"kernels-{common.card_slug(env['card'])}" + ("-tiny" if args.tiny else "")
    tolerance = TOLERANCE[run.dtype]
    path = common.write_results(
        name, env, rows, COLUMNS, args.out,
        extra={"copy_bandwidth_gbps": bandwidth, "dtype": args.dtype, "backend": backend, "tolerance": tolerance,
               "args": vars(args)},
        notes=[f"copy bandwidth {bandwidth:.0f} GB/s; floor = bytes that must move / that bandwidth",
               "t/fla: time over fla's at the same case, decay and mode (< 1 is faster); only for rows that passed",
               f"rel err: max over o and gradients of ||x - ref|| / ||ref|| against float64; tolerance {tolerance:g}"])
    print(f"\nwrote {path}")
    return 1 if any(r["status"] in ("FAILED", "ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
