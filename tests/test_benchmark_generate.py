"""benchmarks/generate_speed.py on CPU: the smoke mode runs end to end (tiny models, short prompts), writes
its JSON / .md / plot, the graph-vs-eager token check passes, peers that cannot run are skipped with a reason,
and the summary reports no speedup for a model whose check failed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location("bench_generate_speed", BENCH_DIR / "generate_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generate_speed = _load()


def _run(args, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "generate_speed.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
        cwd=BENCH_DIR.parent,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def test_dry_run_lists_the_cases(tmp_path):
    proc = _run(["--dry-run", "--lengths", "8K", "1M", "--batch-sizes", "1", "32"], tmp_path)
    names = proc.stdout.split()
    assert "tnl-1b-decode-graph-B32-T1024K" in names and "llama-1b-generate-compiled-B1-T1024K" in names
    assert "retnet-1b-prefill-B1-T8K" in names and "hybrid-1b-generate-static-B1-T8K" in names
    assert names.index("tnl-1b-prefill-B1-T8K") < names.index("tnl-1b-decode-graph-B1-T8K")


def test_plain_graph_rows_stay_out_of_the_graph_targets(tmp_path):
    """--plain-graph adds decode-graph-plain rows (the step without the fused decoding kernels) after each graph
    row; the targets read the fused graph rows only (their case names share the prefix)."""
    proc = _run(["--dry-run", "--models", "tnl-1b", "--lengths", "8K", "--batch-sizes", "1", "--plain-graph"], tmp_path)
    names = proc.stdout.split()
    assert names.index("tnl-1b-decode-graph-B1-T8K") + 1 == names.index("tnl-1b-decode-graph-plain-B1-T8K")
    rows = [
        {"case": "tnl-1b-decode-graph-plain-B1-T8K", "model": "tnl-1b", "B": 1, "T": 8192, "status": "ok",
         "check": "ok", "ms_per_token": 9.0},
        {"case": "tnl-1b-decode-graph-B1-T8K", "model": "tnl-1b", "B": 1, "T": 8192, "status": "ok", "check": "ok",
         "ms_per_token": 1.0},
    ]
    notes = generate_speed.targets(rows, [8192])
    assert any("1.000-1.000 ms/token" in note for note in notes), notes


def test_cpu_smoke_run_writes_results(tmp_path):
    proc = _run(
        [
            "--cpu",
            "--tiny",
            "--profile-graph",  # accepted everywhere, recorded on CUDA only
            "--lengths",
            "96",
            "--batch-sizes",
            "2",
            "--models",
            "tnl-1b",
            "hybrid-1b",
            "llama-1b",
            "retnet-1b",
        ],
        tmp_path,
    )
    data = json.loads((tmp_path / "generate-cpu-tiny.json").read_text())
    rows = {row["case"]: row for row in data["rows"]}
    assert data["env"]["commit"] and data["env"]["torch"]
    for name in ("tnl-1b", "hybrid-1b"):
        assert rows[f"{name}-decode-graph-B2-T96"]["check"] == "ok"
        for case in (
            f"{name}-prefill-B1-T96",
            f"{name}-decode-graph-B2-T96",
            f"{name}-decode-eager-B2-T96",
            f"{name}-generate-static-B1-T96",
            f"{name}-generate-eager-B1-T96",
        ):
            assert rows[case]["status"] == "ok", rows[case]
    assert rows["llama-1b-decode-eager-B2-T96"]["status"] == "ok"
    assert rows["llama-1b-prefill-B1-T96"]["tokens_per_s"] > 0
    assert rows["retnet-1b-prefill-B1-T96"]["status"].startswith("skipped")
    assert rows["llama-1b-generate-compiled-B1-T96"]["status"].startswith("skipped")
    assert (tmp_path / "generate-cpu-tiny.md").read_text().count("|") > 10
    assert "partial:" not in (tmp_path / "generate-cpu-tiny.md").read_text()  # the finished run's notes
    assert (tmp_path / "generate-cpu-tiny.png").stat().st_size > 1000
    summary = (tmp_path / "generate-cpu-tiny-summary.md").read_text()
    assert "| tnl-1b graph | 96 |" in summary and "| retnet-1b | 96 | skipped |" in summary
    assert "tnl-1b-decode-graph-B2-T96" in proc.stdout  # the table is printed


def test_targets_report_no_speedup_without_a_passing_check():
    rows = [
        {
            "case": "tnl-1b-decode-graph-B1-T4K",
            "B": 1,
            "T": 4096,
            "status": "ok",
            "ms_per_token": 1.0,
            "check": "ok",
        },
        {
            "case": "tnl-1b-decode-graph-B1-T1M",
            "B": 1,
            "T": 1 << 20,
            "status": "ok",
            "ms_per_token": 1.05,
            "check": "ok",
        },
        {"case": "tnl-1b-generate-eager-B1-T4K", "B": 1, "T": 4096, "status": "ok", "ms_per_token": 6.0},
        {"case": "tnl-1b-generate-static-B1-T4K", "B": 1, "T": 4096, "status": "ok", "ms_per_token": 1.5},
    ]
    notes = " ".join(generate_speed.targets(rows, (4096, 1 << 20)))
    assert "spread 5.0%" in notes and "4.0x faster" in notes
    rows[0]["check"] = "mismatch"
    notes = " ".join(generate_speed.targets(rows, (4096, 1 << 20)))
    assert "check failed" in notes and "faster" not in notes


def test_llama_target_names_the_path_it_compares_with():
    """The 32K decode target compares with Llama's fastest measured row and says whether that was transformers'
    compiled path or only eager decoding."""

    def row(case, ms, **extra):
        return {"case": case, "B": 1, "T": 32768, "status": "ok", "ms_per_token": ms, **extra}

    rows = [row("tnl-1b-decode-graph-B1-T32K", 1.0, check="ok"), row("llama-1b-decode-eager-B1-T32K", 20.0)]
    notes = " ".join(generate_speed.targets(rows, (32768,)))
    assert "(eager; the compiled row did not run) 20.000: 0.05x" in notes
    rows.append(row("llama-1b-generate-compiled-B1-T32K", 4.0))
    notes = " ".join(generate_speed.targets(rows, (32768,)))
    assert "(compiled static cache) 4.000: 0.25x" in notes


def test_a_run_stopped_part_way_keeps_its_rows(tmp_path, monkeypatch):
    """The JSON is rewritten after every row: a run interrupted at its second case holds the first one."""

    def interrupted(run, name, path, B, T):
        if path == "static":
            raise KeyboardInterrupt  # what a time limit does to the run, as far as the files can tell
        return {"ms_per_token": 1.0}

    monkeypatch.setattr(generate_speed, "case_generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_speed.main(["--cpu", "--tiny", "--models", "tnl-1b", "--cases", "tnl-1b-generate-*",
                             "--out", str(tmp_path)])
    data = json.loads((tmp_path / "generate-cpu-tiny.json").read_text())
    assert [row["case"] for row in data["rows"]] == ["tnl-1b-generate-eager-B1-T64"]
    assert "partial: 1 of 2 cases" in (tmp_path / "generate-cpu-tiny.md").read_text()


def test_targets_compare_fused_and_unfused_graph_steps():
    rows = [
        {"case": "tnl-1b-decode-graph-B1-T32K", "model": "tnl-1b", "B": 1, "T": 32768, "status": "ok",
         "ms_per_token": 1.2, "check": "ok"},
        {"case": "tnl-1b-decode-graph-unfused-B1-T32K", "model": "tnl-1b", "B": 1, "T": 32768, "status": "ok",
         "ms_per_token": 1.5, "check": "ok"},
    ]
    notes = generate_speed.targets(rows, [32768])
    assert any("fused projections 1.200" in n and "1.500 (1.25x)" in n for n in notes), notes
