"""What the benchmark programs share: what ran where, timing, the case registry, result files, training runs."""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PEER_DISTRIBUTIONS = ("flash-linear-attention", "fla-core", "lasp")
KI = 1024
# Relative-error bound of a row's check against float64, by input dtype: 16-bit inputs 2e-2 (every provider lands
# near 2-3e-3; a wrong kernel lands far above), float32 1e-4.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}

# NVLink multicast (NVLS) off: set on import, before any process group exists, and passed to launched processes.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _name, _value in NO_MULTICAST_ENV.items():
    os.environ.setdefault(_name, _value)


def card_slug(name: str) -> str:
    """A file-name form of a card name: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", slug) or "unknown"


def git_commit() -> str:
    """$LASP_HF_COMMIT if set (a copy without .git), else `git rev-parse HEAD`, else "unknown"."""
    if os.environ.get("LASP_HF_COMMIT"):
        return os.environ["LASP_HF_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str | None = None) -> dict:
    """Everything a result file must name: card, software versions, commit, the peers' versions, the date."""
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    return {
        "card": torch.cuda.get_device_name(device) if cuda else "cpu",
        "num_gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": package_version("triton") or package_version("pytorch-triton"),
        "transformers": package_version("transformers"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "peers": {name: package_version(name) for name in PEER_DISTRIBUTIONS},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def describe_env(env: dict) -> str:
    peers = ", ".join(f"{name} {version}" for name, version in env["peers"].items() if version) or "none"
    return (f"card: {env['card']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
            f"transformers {env['transformers']}; commit {env['commit'][:12]}; {env['date_utc'][:10]}; peers: {peers}")


# ----------------------------------------------------------------------------- timing and checks


def bench_ms(fn: Callable[[], object], device: torch.device | str, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of `fn()`: triton.testing.do_bench on CUDA (it flushes L2 between calls; CUDA events
    around ~rep_ms of calls if it fails), the host clock over a few calls on CPU."""
    if torch.device(device).type != "cuda":
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except Exception as err:  # noqa: BLE001 - any failure of the fast path falls back to events
        print(f"[bench] do_bench failed ({type(err).__name__}: {err}); timing with CUDA events", file=sys.stderr)
    fn()
    times = []
    for _ in range(max(3, int(rep_ms // 10))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; inf when x holds a NaN or an Inf (they never pass)."""
    x64, ref64 = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x64).all():
        return float("inf")
    return float((x64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def leaves(*tensors) -> list[torch.Tensor]:
    """Detached copies that require grad: the inputs a timed step differentiates."""
    return [x.detach().clone().requires_grad_() for x in tensors]


def missing(module: str, device: torch.device, cuda: bool = True) -> str | None:
    """None when `module` imports (and `device` is CUDA, if `cuda`), else why a peer's rows are skipped."""
    if cuda and device.type != "cuda":
        return f"{module} needs CUDA"
    try:
        __import__(module)
    except Exception as err:  # noqa: BLE001 - a broken peer install is skipped, not fatal
        return f"{module} unavailable ({type(err).__name__}: {err})"[:160]
    return None


def slopes(H: int) -> torch.Tensor:
    """TransNormerLLM / lightning-attention decay rates per head (positive): 2^(-8(h+1)/H); g = -slopes."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32)


# ----------------------------------------------------------------------------- cases


def parse_length(text: str) -> int:
    """"64K" -> 65536, "1M" -> 1048576, "128" -> 128."""
    value = str(text).strip().upper()
    scale = {"K": KI, "M": KI * KI}.get(value[-1:], 1)
    number = value[:-1] if scale > 1 else value
    if not number.isdigit() or int(number) < 1:
        raise ValueError(f"length {text!r}: expected a positive number of tokens such as 65536, 64K or 1M")
    return int(number) * scale


def cuda_kernel_times(fn: Callable[[], object], device, calls: int = 1) -> tuple[float, dict]:
    """(kernels per call, {kernel name: GPU milliseconds per call}) of `calls` calls of fn, by torch.profiler;
    (0, {}) off CUDA."""
    if torch.device(device).type != "cuda":
        return 0.0, {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    count, per_kernel = 0, {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count += 1
            per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.device_time / 1e3 / calls
    return count / calls, dict(sorted(per_kernel.items(), key=lambda item: -item[1]))


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
    """The cases of one program, in registration order: `@CASES.case("chunk", dict(B=1, H=16, T=8192))` on
    `def chunk(run, name, B, H, T)` registers "chunk-B1-H16-T8K"; `select(["chunk-B1-*"])` picks by glob."""

    def __init__(self) -> None:
        self._cases: list[Case] = []

    def case(self, prefix: str, *param_sets: dict) -> Callable:
        def register(fn: Callable) -> Callable:
            for params in param_sets or ({},):
                parts = [f"{k}{short_number(v) if isinstance(v, int) else v}" for k, v in params.items()]
                name = "-".join([prefix] + parts)
                if name in self.names():
                    raise ValueError(f"benchmark case {name!r} is registered twice")
                self._cases.append(Case(name, fn, dict(params)))
            return fn

        return register

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
    """Rows as an aligned text table, or a Markdown one."""
    cells = [[col.header for col in columns]] + [[col.render(row) for col in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join(lines[:1] + ["|" + "|".join("---" for _ in columns) + "|"] + lines[1:])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells]
    return "\n".join(lines[:1] + ["  ".join("-" * width for width in widths)] + lines[1:])


def write_results(name: str, env: dict, rows: Sequence[dict], columns: Sequence[Column], out_dir=None,
                  extra: dict | None = None, notes: Sequence[str] = ()) -> Path:
    """`<out_dir>/<name>.json` (env, extra, every row) and `<name>.md` (env line, table, notes); the JSON path."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "env": env, **(extra or {}), "rows": list(rows)},
                               indent=1, default=str) + "\n")
    md = [f"# {name}", "", describe_env(env), "", format_table(rows, columns, markdown=True)]
    md += [""] + [f"- {note}" for note in notes] if notes else []
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    return path


def common_parser(description: str) -> argparse.ArgumentParser:
    """The options of every case-registry program."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help=f"directory for the JSON and .md (default {RESULTS_DIR})")
    parser.add_argument("--cases", nargs="*", default=None, help="glob patterns of case names (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="list the selected cases and exit")
    parser.add_argument("--cpu", action="store_true", help="run on CPU tensors (smoke test of the harness)")
    parser.add_argument("--tiny", action="store_true", help="shrink every shape (smoke test of the harness)")
    return parser


# ----------------------------------------------------------------------------- training runs


def run_process_group(cmd: Sequence[str], env: dict, timeout_s: float, log_file: Path | None = None) -> None:
    """`subprocess.run(cmd, check=True)` in a process group of its own, which is killed whole when `timeout_s`
    passes: a launcher's workers (torchrun, accelerate launch) must not outlive it holding GPUs. Output goes to
    `log_file` when given."""
    with open(log_file, "w") if log_file else contextlib.nullcontext() as log:
        out = {"stdout": log, "stderr": subprocess.STDOUT} if log else {}
        proc = subprocess.Popen(list(cmd), env=env, start_new_session=True, **out)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait_s)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            raise
    if code != 0:
        raise subprocess.CalledProcessError(code, list(cmd))


def launch_training(world: int, out_dir: Path, *, model_config: str, block_size: int, steps: int, bf16: bool,
                    gradient_checkpointing: bool, cpu: bool, timeout_s: int, config_file: str | None = None,
                    extra: Sequence[str] = (), log_file: Path | None = None) -> list[dict]:
    """One `accelerate launch recipes/train_clm.py` run on `world` processes (SP = world), one block per step,
    fixed seeds; returns its logged steps (trainer_state.json's entries that have a loss). `model_config` None:
    `extra` names the model (`--model_name_or_path`). `log_file`: the run's output goes there instead of to the
    terminal (so a caller can tell an out-of-memory failure from others)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(world), "--num_machines", "1",
           "--mixed_precision", "bf16" if bf16 else "no", "--dynamo_backend", "no"]
    if config_file:
        cmd += ["--config_file", config_file]
    elif cpu and world > 1:
        cmd += ["--config_file", str(REPO_ROOT / "recipes/accelerate/cpu_sp2.yaml")]
    elif cpu:
        cmd.append("--cpu")
    elif world > 1:
        cmd.append("--multi_gpu")
    cmd += [str(REPO_ROOT / "recipes/train_clm.py")] + (["--model_config", model_config] if model_config else [])
    cmd += ["--block_size", str(block_size),
            "--max_steps", str(steps), "--per_device_train_batch_size", "1", "--learning_rate", "3e-4",
            "--warmup_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--seed", "0", "--data_seed", "0", "--sequence_parallel_size", str(world), "--output_dir", str(out_dir),
            "--dataloader_num_workers", "0"]
    cmd += ["--bf16"] if bf16 else []
    cmd += ["--use_cpu"] if cpu else []  # (TrainingArguments refuses --bf16 without a GPU unless told)
    cmd += ["--gradient_checkpointing"] if gradient_checkpointing else []
    cmd += list(extra)
    env = {**os.environ, **NO_MULTICAST_ENV, "HF_HUB_OFFLINE": "1"}
    if not cpu:  # SP = 1 on exactly one GPU (one process seeing several would be a DataParallel run)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(world))
    print("$", " ".join(cmd), flush=True)
    run_process_group(cmd, env, timeout_s, log_file)
    state = json.loads((out_dir / "trainer_state.json").read_text())
    return [row for row in state["log_history"] if "loss" in row]
