"""Shared plumbing of the benchmark programs: what ran where, how it is timed, how results are kept.

- `environment()`: card, torch / triton / transformers versions, the commit, the peers' versions.
- `bench_ms(fn)`: median milliseconds of `fn()` (triton.testing.do_bench on CUDA, CUDA events if
  that fails, perf_counter on CPU).
- `copy_bandwidth_gbps()`: a large device-to-device copy, the yardstick of memory-bound floors.
- `Registry`: the benchmark's cases (a decorator registers a function once per parameter set).
- `print_table()` / `write_results()`: the table on stdout, JSON + a short .md under
  `benchmarks/results/` (or `--out DIR`).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PEER_DISTRIBUTIONS = ("flash-linear-attention", "fla-core", "lasp")
KI = 1024

# Multicast (NVLS) is off on the lent GPU machines. Set on import, so before any benchmark makes a process group,
# and passed on by those that start processes of their own.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _name, _value in NO_MULTICAST_ENV.items():
    os.environ.setdefault(_name, _value)


# ----------------------------------------------------------------------------- environment


def card_name(device: torch.device | str | None = None) -> str:
    """The accelerator's marketing name ("NVIDIA H100 80GB HBM3"), or "cpu"."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "cpu"


def card_slug(name: str) -> str:
    """A file-name form of a card name: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", slug) or "unknown"


def git_commit() -> str:
    """$LASP_HF_COMMIT if set (the GPU machine's copy has no .git), else `git rev-parse HEAD`."""
    commit = os.environ.get("LASP_HF_COMMIT")
    if commit:
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str | None = None, peers: Iterable[str] = PEER_DISTRIBUTIONS) -> dict:
    """Everything a result file must name: card, software versions, commit, peers' versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    return {
        "card": card_name(device),
        "num_gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": triton_version,
        "transformers": package_version("transformers"),
        "lasp_hf": package_version("lasp-hf"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_pinning": os.environ.get("LASP_HF_BENCH_PIN", "0"),
        "peers": {name: package_version(name) for name in peers},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def pin_cpus_from_env() -> list[int] | None:
    """With LASP_HF_BENCH_PIN=1, pin this process (and the threads it starts later: NCCL's, the process group's)
    to its own share of the usable CPUs: the LOCAL_WORLD_SIZE ranks of a node split them into contiguous blocks,
    rank LOCAL_RANK takes block LOCAL_RANK. Call before the process group exists. Returns the CPUs, or None."""
    if os.environ.get("LASP_HF_BENCH_PIN", "0") != "1" or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    ranks, rank = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    per = max(len(cpus) // ranks, 1)
    mine = cpus[rank * per:(rank + 1) * per] or cpus
    os.sched_setaffinity(0, mine)
    return mine


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_event_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> list[float]:
    """Per-call milliseconds of `fn()` measured with CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def wall_ms(fn: Callable[[], object], warmup: int = 1, iters: int = 5) -> list[float]:
    """Per-call milliseconds of `fn()` by the host clock (CPU tensors)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bench_ms(
    fn: Callable[[], object], device: torch.device | str, warmup_ms: float = 25, rep_ms: float = 100
) -> float:
    """Median milliseconds of `fn()` on `device`.

    CUDA: triton.testing.do_bench (which flushes L2 between calls); if that is unavailable or
    fails, CUDA events around ~rep_ms worth of calls. CPU: the host clock, a few calls.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return statistics.median(wall_ms(fn))
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except Exception as err:  # noqa: BLE001 - any failure of the fast path falls back to events
        print(
            f"[bench] do_bench failed ({type(err).__name__}: {err}); timing with CUDA events", file=sys.stderr
        )
    first = statistics.median(cuda_event_ms(fn, warmup=1, iters=3))
    iters = max(3, min(1000, int(rep_ms / max(first, 1e-3))))
    return statistics.median(cuda_event_ms(fn, warmup=max(1, int(warmup_ms / max(first, 1e-3))), iters=iters))


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Achieved device-memory bandwidth (GB/s, 1e9) of a device-to-device copy of `nbytes`:
    bytes read plus bytes written over the median copy time."""
    device = torch.device(device)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def floor_ms(nbytes: float, bandwidth_gbps: float) -> float:
    """Milliseconds to move `nbytes` at `bandwidth_gbps`: no kernel that moves them can be faster."""
    return nbytes / (bandwidth_gbps * 1e9) * 1e3


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; inf when x holds a NaN or an Inf (they never pass)."""
    x64, ref64 = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x64).all():
        return float("inf")
    return float((x64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- cases


def short_number(n: int) -> str:
    """8192 -> "8K", 131072 -> "128K", 64 -> "64"."""
    return f"{n // KI}K" if n >= KI and n % KI == 0 else str(n)


@dataclass
class Case:
    name: str
    fn: Callable
    params: dict = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **self.params, **kwargs)


class Registry:
    """The cases of one benchmark program, in the order they were registered.

        CASES = Registry()

        @CASES.case("chunk", dict(B=1, H=16, T=8192), dict(B=8, H=32, T=4096))
        def chunk(run, B, H, T): ...

    registers "chunk-B1-H16-T8K" and "chunk-B8-H32-T4K"; `select(["chunk-B1-*"])` picks by glob.
    """

    def __init__(self) -> None:
        self._cases: list[Case] = []

    def case(self, prefix: str, *param_sets: dict) -> Callable:
        def register(fn: Callable) -> Callable:
            for params in param_sets or ({},):
                name = "-".join(
                    [prefix]
                    + [
                        f"{key}{short_number(value) if isinstance(value, int) else value}"
                        for key, value in params.items()
                    ]
                )
                if any(existing.name == name for existing in self._cases):
                    raise ValueError(f"benchmark case {name!r} is registered twice")
                self._cases.append(Case(name, fn, dict(params)))
            return fn

        return register

    def __iter__(self):
        return iter(self._cases)

    def __len__(self) -> int:
        return len(self._cases)

    def names(self) -> list[str]:
        return [case.name for case in self._cases]

    def select(self, patterns: Sequence[str] | None = None) -> list[Case]:
        """Cases whose name matches any glob in `patterns` (all when None or empty)."""
        if not patterns:
            return list(self._cases)
        chosen = [c for c in self._cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
        if not chosen:
            raise ValueError(f"no benchmark case matches {list(patterns)}; the cases are {self.names()}")
        return chosen


# ----------------------------------------------------------------------------- output


@dataclass
class Column:
    key: str
    header: str
    fmt: str = "{}"

    def render(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None or value == "":
            return "-"
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        try:
            return self.fmt.format(value)
        except (ValueError, TypeError):
            return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[Column], markdown: bool = False) -> str:
    """Rows as an aligned text table (or a Markdown table)."""
    cells = [[col.header for col in columns]] + [[col.render(row) for col in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(line) + " |" for line in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[dict], columns: Sequence[Column]) -> None:
    print(f"\n{title}")
    print(format_table(rows, columns), flush=True)


def describe_env(env: dict) -> str:
    peers = ", ".join(f"{name} {version}" for name, version in env["peers"].items() if version) or "none"
    return (
        f"card: {env['card']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"transformers {env['transformers']}; commit {env['commit'][:12]}; peers: {peers}"
    )


def write_results(
    name: str,
    env: dict,
    rows: Sequence[dict],
    columns: Sequence[Column],
    out_dir: str | Path | None = None,
    extra: dict | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write `<out_dir>/<name>.json` (env, rows, extra) and `<name>.md` (env line + table + notes).

    `name` already holds the card slug (e.g. "kernels-h100-80gb-hbm3"). Returns the JSON path.
    """
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "env": env, **(extra or {}), "rows": list(rows)}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md = [f"# {name}", "", describe_env(env), "", format_table(rows, columns, markdown=True)]
    if notes:
        md += [""] + [f"- {note}" for note in notes]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    return json_path


def common_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark program takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help=f"directory for the JSON and .md (default {RESULTS_DIR})")
    parser.add_argument("--cases", nargs="*", default=None, help="glob patterns of case names (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="list the selected cases and exit")
    parser.add_argument("--cpu", action="store_true", help="run on CPU tensors (smoke test of the harness)")
    parser.add_argument("--tiny", action="store_true", help="shrink every shape (smoke test of the harness)")
    return parser


# ----------------------------------------------------------------------------- summary of result files


def _pivot(rows: Sequence[dict], keys: Sequence[str], providers: Sequence[str], value: str) -> list[dict]:
    """One line per distinct `keys`, one column per provider holding that provider's `value`
    (or its status when it did not pass)."""
    lines: dict = {}
    for row in rows:
        line = lines.setdefault(tuple(row.get(k) for k in keys), {k: row.get(k) for k in keys})
        provider, passed = row["provider"], row.get("status") == "ok"

        def cell(key):  # the number; the status where the row did not pass; None (shown "-") if not measured
            return row.get(key) if passed else row.get("status")

        if provider in providers:
            line[provider] = cell(value)
            line[f"err_{provider}"] = row.get("err")
            if provider == providers[0]:
                line.update({k: row.get(k) for k in ("t_vs_fla", "efficiency", "vs_lasp", "floor_ms")})
            line[f"{provider}_pipe"] = cell("ms_pipe")  # sp_scaling.py's pipelined timing
            line[f"{provider}_host"] = cell("host_ms_pipe")
        if provider in ("ring", "allgather"):
            line[f"eff_{provider}"] = row.get("efficiency")
            line[f"eff_pipe_{provider}"] = row.get("efficiency_pipe")
            line[f"vs_lasp_{provider}"] = row.get("vs_lasp")
            line[f"vs_lasp_pipe_{provider}"] = row.get("vs_lasp_pipe")
    return list(lines.values())


def summarize(out_dir: str | Path) -> str:
    """Compact tables of every kernels-*.json and sp-*.json in `out_dir` (the device run's last words)."""
    out = Path(out_dir)
    parts = []
    for path in sorted(out.glob("kernels-*.json")):
        data = json.loads(path.read_text())
        rows = [r for r in data["rows"] if r["mode"] != "decode"]
        decode = [r for r in data["rows"] if r["mode"] == "decode"]
        providers = ("lasp_hf", "fla", "lasp-ref", "sdpa")
        cols = [
            Column("case", "case"),
            Column("decay", "g"),
            Column("mode", "mode"),
            Column("floor_ms", "floor", "{:.3f}"),
        ]
        cols += [Column(p, f"{p} ms", "{:.3f}") for p in providers]
        cols += [
            Column("t_vs_fla", "ours/fla", "{:.2f}x"),
            Column("err_lasp_hf", "err ours", "{:.1e}"),
            Column("err_fla", "err fla", "{:.1e}"),
        ]
        parts.append(f"{path.name}: {data['env']['card']}, commit {data['env']['commit'][:12]}")
        if rows:
            parts.append(format_table(_pivot(rows, ("case", "decay", "mode"), providers, "ms"), cols))
        if decode:
            cols = [
                Column("case", "case"),
                Column("floor_ms", "floor ms", "{:.4f}"),
                Column("lasp_hf", "lasp_hf us", "{:.1f}"),
                Column("fla", "fla us", "{:.1f}"),
                Column("t_vs_fla", "ours/fla", "{:.2f}x"),
            ]
            parts.append(format_table(_pivot(decode, ("case",), ("lasp_hf", "fla"), "us"), cols))
    for path in sorted(out.glob("sp-*.json")):
        data = json.loads(path.read_text())
        providers = ("single", "ring", "allgather", "lasp-ref")
        cols = [Column("case", "case"), Column("W", "W")] + [
            Column(p, f"{p} ms", "{:.3f}") for p in providers
        ]
        cols += [Column(f"{p}_pipe", f"{p} pipe", "{:.3f}") for p in providers]
        cols += [Column(f"{p}_host", f"{p} host", "{:.3f}") for p in providers[:3]]
        cols += [
            Column("eff_ring", "eff ring", "{:.2f}"),
            Column("eff_allgather", "eff ag", "{:.2f}"),
            Column("eff_pipe_ring", "eff ring pipe", "{:.2f}"),
            Column("eff_pipe_allgather", "eff ag pipe", "{:.2f}"),
            Column("vs_lasp_ring", "ring/lasp tok/s", "{:.1f}x"),
            Column("vs_lasp_allgather", "ag/lasp tok/s", "{:.1f}x"),
            Column("vs_lasp_pipe_ring", "ring/lasp pipe", "{:.1f}x"),
            Column("vs_lasp_pipe_allgather", "ag/lasp pipe", "{:.1f}x"),
        ]
        parts.append(
            f"{path.name}: {data['env']['card']}, commit {data['env']['commit'][:12]}\n"
            + format_table(_pivot(data["rows"], ("case", "W"), providers, "ms"), cols)
        )
    return "\n\n".join(parts) if parts else f"no kernels-*.json or sp-*.json in {out}"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "summary":
        sys.exit("usage: python benchmarks/common.py summary RESULTS_DIR")
    print(summarize(sys.argv[2]))
