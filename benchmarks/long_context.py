"""Long-context training side by side on the same W GPUs: tnl-1b and hybrid-1b under LASP against an HF Llama of the
same size with accelerate's context parallelism.

    python benchmarks/long_context.py --world 4                                  # every system, 64K ... 1M tokens
    python benchmarks/long_context.py --world 4 --systems llama-cp --lengths 64K 128K 256K 512K
    python benchmarks/long_context.py --world 4 --systems tnl-1b --lengths 2M 4M --savers_from 2M
    python benchmarks/long_context.py --cpu --tiny --world 2 --systems tnl-1b --lengths 64 128   # gloo smoke test

Systems (one `--lengths` ladder each, tokens per sequence, one sequence per step, cut over the W GPUs):
- `tnl-1b`, `hybrid-1b`: `recipes/train_clm.py` under SP = W (`recipes/accelerate/fsdp2_sp<W>.yaml`: FSDP2 over
  the same W ranks; `--accelerate_config` for another), float32 weights with bf16 compute, activation checkpointing,
  chunked cross-entropy; from `--savers_from` on also offloaded activations and chunked MLP / projections. The data
  is one document (the shipped corpus written out as one text, repeated to the length): no state resets inside a
  sequence.
- `llama-cp`: `benchmarks/llama_cp_train.py` (HF `LlamaForCausalLM`, 1.08B parameters, SDPA, FSDP2 + torch's
  context parallelism through accelerate's `ParallelismConfig(cp_size=W)`, ring attention over the whole causal
  sequence, the same chunked cross-entropy, activation checkpointing), random tokens.

Each (system, length) is one launch of --steps steps; tokens/s is the median over the steps after --skip, peak
memory the highest per-GPU peak (`torch.cuda.max_memory_allocated`). A system stops at its first failure: `OOM`
(an out-of-memory error in its output), `TIMEOUT` (--timeout-s per launch, or what is left of --budget-s) or
`FAILED`; the longest length that trained is its `longest`. The result file is rewritten after every launch, and a
later call for other systems on the same card and W adds its rows to it (rows of the systems run now replace
theirs), so the systems may run in separate calls; `--merge A.json B.json ...` takes the rows of result files
written elsewhere (separate machine starts), and with `--systems` left empty only writes the combined file. Writes `long-context-<card>-W<W>.json` (+ .md, + .png: tokens/s
and memory against length per system) with the ratios the targets name: tnl-1b's tokens/s over Llama + CP's at
256K (target >= 8x) and the ratio of the longest sequences (target >= 4x).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (KI, NO_MULTICAST_ENV, REPO_ROOT, RESULTS_DIR, Column, card_slug, environment,  # noqa: E402
                    format_table, launch_training, parse_length, run_process_group, short_number, write_results)
from train_mfu import steady_row  # noqa: E402

OURS = {"tnl-1b": "tnl-1b.json", "hybrid-1b": "hybrid-1b.json"}
PEER = "llama-cp"
SYSTEMS = (*OURS, PEER)
LENGTHS = ("64K", "128K", "256K", "512K", "1M")
TINY_CONFIG = REPO_ROOT / "recipes/configs/tnl-tiny.json"
CORPUS = REPO_ROOT / "data/corpus.jsonl"
CORPUS_TOKENS = 600_000  # fewer than the shipped corpus holds as one document (~750K): repeats never fall short
SAVERS = {"offload_activations": True, "mlp_chunk_size": 16384, "attention_chunk_size": 16384}
OOM_PATTERN = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory", re.IGNORECASE)


def one_document_corpus(path: Path, num_tokens: int) -> Path:
    """The shipped corpus as ONE jsonl document, repeated until it holds more than `num_tokens` tokens."""
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines() if line.strip()]
    repeats = num_tokens // CORPUS_TOKENS + 1
    path.write_text(json.dumps({"text": "\n\n".join(texts * repeats)}) + "\n")
    return path


def failure_status(log: str) -> str:
    return "OOM" if OOM_PATTERN.search(log) else "FAILED"


def saver_config(source: Path, out: Path) -> Path:
    """A copy of a LaspConfig json with the chunked MLP and projections of SAVERS."""
    config = json.loads(source.read_text())
    config.update({k: v for k, v in SAVERS.items() if k != "offload_activations"})
    out.write_text(json.dumps(config, indent=1))
    return out


class Launcher:
    """Runs one (system, length) and turns its output into a row."""

    def __init__(self, args, scratch: Path, deadline: float):
        self.args, self.scratch, self.deadline = args, scratch, deadline
        self.world = args.world

    def timeout(self) -> int:
        return int(min(self.args.timeout_s, self.deadline - time.monotonic()))

    def ours(self, system: str, T: int) -> tuple[list[dict], list[str]]:
        config = REPO_ROOT / "recipes/configs" / OURS[system]
        if self.args.tiny:  # tnl-tiny; for hybrid-1b with its second layer softmax attention, as hybrid-1b mixes them
            tiny = json.loads(TINY_CONFIG.read_text())
            if system == "hybrid-1b":
                tiny["layer_types"] = ["linear_attention", "full_attention"]
            config = self.scratch / f"{system}-tiny.json"
            config.write_text(json.dumps(tiny))
        savers = ["activation checkpointing", "chunked cross-entropy"]
        extra = ["--train_file", str(one_document_corpus(self.scratch / f"doc-{T}.jsonl", T))]
        if self.args.savers_from is not None and T >= self.args.savers_from:
            config = saver_config(config, self.scratch / f"{system}-savers.json")
            extra.append("--offload_activations")
            savers += ["offloaded activations", f"chunked MLP / projections ({SAVERS['mlp_chunk_size']})"]
        accelerate_config = self.args.accelerate_config
        if accelerate_config is None and not self.args.cpu and self.world > 1:
            accelerate_config = str(REPO_ROOT / f"recipes/accelerate/fsdp2_sp{self.world}.yaml")
        if accelerate_config and "fsdp" in Path(accelerate_config).name:
            savers.append(f"FSDP2 over {self.world}")
        hist = launch_training(self.world, self.scratch / f"{system}-{T}", model_config=str(config), block_size=T,
                               steps=self.args.steps, bf16=not self.args.cpu, gradient_checkpointing=True,
                               cpu=self.args.cpu, timeout_s=self.timeout(), config_file=accelerate_config,
                               extra=extra, log_file=self.log_path(system, T))
        return hist, savers

    def llama(self, T: int) -> tuple[list[dict], list[str]]:
        out = self.scratch / f"llama-{T}.json"
        cmd = [sys.executable, str(REPO_ROOT / "benchmarks/llama_cp_train.py"), "--seq_len", str(T), "--steps",
               str(self.args.steps), "--json", str(out)] + (["--cpu"] if self.args.cpu else [])
        cmd += ["--tiny"] if self.args.tiny else []
        if self.world > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(self.world)] + cmd[1:]
        env = {**os.environ, **NO_MULTICAST_ENV, "HF_HUB_OFFLINE": "1"}
        if not self.args.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(self.world))
        print("$", " ".join(cmd), flush=True)
        run_process_group(cmd, env, self.timeout(), self.log_path(PEER, T))
        run = json.loads(out.read_text())
        hist = run["steps"]
        hist[-1]["peak_memory_gb"] = run["peak_memory_gb"]  # every rank's highest, not rank 0's alone
        savers = ["activation checkpointing", "chunked cross-entropy"]
        return hist, savers + ([f"FSDP2 + context parallel over {self.world}"] if self.world > 1 else [])

    def log_path(self, system: str, T: int) -> Path:
        return self.scratch / f"{system}-{T}.log"

    def row(self, system: str, T: int) -> dict:
        row = {"system": system, "seq_len": T, "length": short_number(T), "world": self.world,
               "tokens_per_gpu": T // self.world}
        if self.timeout() < 30:
            return {**row, "status": "not run", "note": "--budget-s spent"}
        began = time.monotonic()
        try:
            hist, savers = self.llama(T) if system == PEER else self.ours(system, T)
            row.update(steady_row(hist, self.args.skip, self.world, None), savers=savers)
        except subprocess.TimeoutExpired as err:
            row.update(status="TIMEOUT", note=f"no result within {err.timeout:.0f} s")
        except (subprocess.CalledProcessError, OSError, KeyError, json.JSONDecodeError) as err:
            log = self.log_path(system, T)
            text = log.read_text(errors="replace") if log.exists() else ""
            row.update(status=failure_status(text), note=(text.strip().splitlines() or [str(err)])[-1][:200])
            print(text[-3000:], file=sys.stderr, flush=True)
        row["wall_s"] = round(time.monotonic() - began, 1)
        for key in ("tokens_per_second_per_step", "mfu", "tflops_per_gpu"):
            row.pop(key, None)  # (per-step rates stay in the launch's log; MFU is train_mfu.py's question)
        return row


def summary(rows: list[dict], systems) -> tuple[dict, list[str]]:
    """Longest length per system and the target ratios."""
    longest = {}
    for system in systems:
        ok = [r["seq_len"] for r in rows if r["system"] == system and r["status"] == "ok"]
        stopped = [r for r in rows if r["system"] == system and r["status"] not in ("ok", "not run")]
        longest[system] = {"longest": max(ok, default=None), "stopped_by": stopped[0]["status"] if stopped else None}
    notes = []
    for system, info in longest.items():
        top = f"{info['longest']:,}" if info["longest"] else "none"
        why = f", then {info['stopped_by']}" if info["stopped_by"] else " (every length run fit: the ladder's end)"
        notes.append(f"{system}: longest sequence trained {top} tokens{why}")
    by = {(r["system"], r["seq_len"]): r for r in rows if r["status"] == "ok"}
    peer = by.get((PEER, 256 * KI))
    for system in OURS:
        mine = by.get((system, 256 * KI))
        if mine and peer:
            ratio = mine["tokens_per_second"] / peer["tokens_per_second"]
            notes.append(f"256K: {system} {mine['tokens_per_second']:,.0f} tok/s vs {PEER} "
                         f"{peer['tokens_per_second']:,.0f}: {ratio:.1f}x (target >= 8x)")
        a, b = longest.get(system, {}).get("longest"), longest.get(PEER, {}).get("longest")
        if a and b:
            notes.append(f"longest: {system} / {PEER} = {a / b:.1f}x (target >= 4x)")
    return longest, notes


def plot(rows: list[dict], path: Path) -> Path | None:
    """tokens/s and peak memory per GPU against tokens per sequence, one line per system; failures as x."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[long_context] matplotlib is not installed: no plot", file=sys.stderr)
        return None
    if not any(r["status"] == "ok" for r in rows):
        return None  # nothing trained: nothing to draw
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["seq_len"])
        ok = [r for r in mine if r["status"] == "ok"]
        for ax, key in zip(axes, ("tokens_per_second", "peak_memory_gb")):
            line = ax.plot([r["seq_len"] for r in ok], [r[key] for r in ok], marker="o", label=system)
            failed = [r for r in mine if r["status"] not in ("ok", "not run")]
            if failed and ok:
                ax.plot([r["seq_len"] for r in failed], [ok[-1][key]] * len(failed), "x", ms=10,
                        color=line[0].get_color())
    for ax, label in zip(axes, ("tokens/s (whole job)", "peak memory per GPU (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("x: the first length that failed (OOM / timeout), drawn at the last value that fit", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COLUMNS = [Column("system", "system"), Column("length", "tokens/seq"), Column("tokens_per_gpu", "tokens/GPU"),
           Column("status", "status"), Column("tokens_per_second", "tok/s", "{:,.0f}"),
           Column("tokens_per_second_per_gpu", "tok/s/GPU", "{:,.0f}"),
           Column("peak_memory_gb", "peak GiB/GPU", "{:.1f}"), Column("steps_averaged", "steps"),
           Column("wall_s", "wall s", "{:.0f}"), Column("note", "note")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4, help="GPUs (= SP size = CP size) of every run")
    parser.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS,
                        help="systems to run (none: only --merge)")
    parser.add_argument("--merge", nargs="+", default=[], help="result files whose rows join this one's")
    parser.add_argument("--lengths", nargs="+", default=list(LENGTHS), help="tokens per sequence: 65536, 64K, 1M")
    parser.add_argument("--steps", type=int, default=3, help="training steps per launch")
    parser.add_argument("--skip", type=int, default=1, help="first steps left out of the median")
    parser.add_argument("--savers_from", default=None,
                        help="from this length on, our runs also offload activations and chunk the MLP / projections")
    parser.add_argument("--accelerate_config", default=None, help="our runs' config (default fsdp2_sp<W>.yaml)")
    parser.add_argument("--timeout-s", dest="timeout_s", type=int, default=600, help="limit of one launch")
    parser.add_argument("--budget-s", dest="budget_s", type=int, default=None,
                        help="limit of this whole call: later launches get what is left, none below 30 s")
    parser.add_argument("--cpu", action="store_true", help="CPU processes over gloo (smoke test; no llama-cp CP)")
    parser.add_argument("--tiny", action="store_true", help="tnl-tiny for ours, a 2-layer Llama (smoke test)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    args.lengths = sorted(parse_length(x) for x in args.lengths)
    args.savers_from = parse_length(args.savers_from) if args.savers_from else None
    if args.steps <= args.skip:
        raise ValueError(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    if args.world < 1 or any(T % (2 * args.world) for T in args.lengths):
        raise ValueError(f"every length must be a multiple of 2 x --world ({2 * args.world}): SP and CP cut it into "
                         f"equal slices; got {args.lengths}")
    if args.cpu and PEER in args.systems and args.world > 1:
        raise ValueError("llama-cp on CPU runs one process without context parallelism (torch's needs CUDA): use "
                         "--world 1 for it, or leave it out of --systems")
    missing = [] if args.cpu or args.accelerate_config or args.world == 1 else \
        [W for W in [args.world] if not (REPO_ROOT / f"recipes/accelerate/fsdp2_sp{W}.yaml").exists()]
    if missing and any(s in OURS for s in args.systems):
        raise ValueError(f"no recipes/accelerate/fsdp2_sp{args.world}.yaml: pass --accelerate_config")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = [(system, T) for system in args.systems for T in args.lengths]
    if args.dry_run:
        print("\n".join(f"{system} {short_number(T)} ({T // args.world} tokens per GPU)" for system, T in plan))
        return 0
    merged = [json.loads(Path(path).read_text()) for path in args.merge]
    env = environment() if args.systems or not merged else merged[0]["env"]
    name = f"long-context-{card_slug(env['card'])}-W{args.world}" + ("-tiny" if args.tiny else "")
    out = Path(args.out)
    previous = [out / f"{name}.json"] if (out / f"{name}.json").exists() else []
    kept = {}  # (system, length) -> row: later files win, and the systems run now replace theirs
    for data in [json.loads(p.read_text()) for p in previous] + merged:
        if data["env"]["card"] != env["card"] or any(r["world"] != args.world for r in data["rows"]):
            raise ValueError(f"{data['benchmark']}: rows of {data['env']['card']} at another W cannot join "
                             f"{env['card']} W = {args.world}")
        kept.update({(r["system"], r["seq_len"]): r for r in data["rows"] if r["system"] not in args.systems})
    kept = list(kept.values())
    deadline = time.monotonic() + (args.budget_s or math.inf)
    scratch = Path(tempfile.mkdtemp(prefix="long-context-"))
    launcher, rows = Launcher(args, scratch, deadline), []

    def write() -> Path:
        every = sorted(kept + rows, key=lambda r: (SYSTEMS.index(r["system"]), r["seq_len"]))
        longest, notes = summary(every, dict.fromkeys(r["system"] for r in every))
        notes = [f"command: `{' '.join(sys.argv)}`"] + notes
        path = write_results(name, env, every, COLUMNS, out, extra={"args": vars(args), "longest": longest},
                             notes=notes)
        plot(every, out / f"{name}.png")
        return path

    path = write() if not args.systems else None
    try:
        for system in args.systems:
            for T in args.lengths:
                row = launcher.row(system, T)
                rows.append(row)
                print(f"[long_context] {system} {short_number(T)}: {row['status']}", flush=True)
                path = write()
                if row["status"] != "ok":
                    break  # longer sequences of this system would fail the same way
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(format_table(rows or kept, COLUMNS) + f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
