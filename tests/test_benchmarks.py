"""The benchmark programs (benchmarks/): their plumbing, their float64 check, and CPU smoke runs.

The timings themselves are only meaningful on a GPU (benchmarks/run_device.sh); here we check that
the programs run end to end, that their correctness checks catch a wrong provider, and that what
they write (JSON, .md, run_device.sh's summary) holds what benchmarks/README.md says.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    """Import benchmarks/<name>.py under a private module name (bench_<name>), so that it takes no name another
    module of the process may want."""
    sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


common = _load("common")
kernel_speed = _load("kernel_speed")
sp_scaling = _load("sp_scaling")


def _run(args, timeout=240, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
        cwd=BENCH_DIR.parent,
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


# ----------------------------------------------------------------------------- common.py


def test_registry_names_order_and_selection():
    reg = common.Registry()

    @reg.case("chunk", dict(B=1, T=8192), dict(B=8, T=4096), dict(B=2, T=100))
    def chunk(run, name, B, T):
        return [(name, B, T)]

    @reg.case("decode")
    def decode(run, name):
        return [name]

    assert reg.names() == ["chunk-B1-T8K", "chunk-B8-T4K", "chunk-B2-T100", "decode"]
    assert [c.name for c in reg.select(["chunk-B8-*", "decode"])] == ["chunk-B8-T4K", "decode"]
    assert len(reg.select(None)) == 4
    case = reg.select(["chunk-B1-*"])[0]
    assert case(None, case.name) == [("chunk-B1-T8K", 1, 8192)]
    with pytest.raises(ValueError, match="no benchmark case matches"):
        reg.select(["nothing-*"])
    with pytest.raises(ValueError, match="registered twice"):
        reg.case("decode")(decode)


def test_table_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv("LASP_HF_COMMIT", "0123456789abcdef")
    env = common.environment("cpu")
    assert env["commit"] == "0123456789abcdef" and env["card"] == "cpu" and env["torch"] == torch.__version__
    assert set(env["peers"]) == set(common.PEER_DISTRIBUTIONS)
    rows = [{"case": "c1", "ms": 1.23456, "status": "ok"}, {"case": "c2", "ms": None, "status": "SKIP"}]
    cols = [
        common.Column("case", "case"),
        common.Column("ms", "ms", "{:.2f}"),
        common.Column("status", "status"),
    ]
    text = common.format_table(rows, cols)
    lines = text.splitlines()
    assert lines[0].split() == ["case", "ms", "status"]
    assert lines[2].split() == ["c1", "1.23", "ok"] and lines[3].split() == ["c2", "-", "SKIP"]
    path = common.write_results(
        "kernels-test", env, rows, cols, tmp_path, extra={"copy_bandwidth_gbps": 3.0}, notes=["a note"]
    )
    data = json.loads(path.read_text())
    assert data["env"]["commit"] == "0123456789abcdef" and data["copy_bandwidth_gbps"] == 3.0
    assert data["rows"] == rows
    md = (tmp_path / "kernels-test.md").read_text()
    assert "| case | ms | status |" in md and "| c1 | 1.23 | ok |" in md and "- a note" in md
    assert "commit 0123456789ab" in md


def test_names_and_numbers():
    assert common.card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert common.card_slug("cpu") == "cpu"
    assert [common.short_number(n) for n in (8192, 131072, 100, 1000)] == ["8K", "128K", "100", "1000"]
    x = torch.ones(10)
    assert common.relative_error(x * 1.01, x) == pytest.approx(0.01)
    assert common.relative_error(torch.full((3,), float("nan")), torch.ones(3)) == math.inf
    assert common.bench_ms(lambda: x.sum(), "cpu") > 0
    assert kernel_speed.copy_bandwidth_gbps(torch.device("cpu"), nbytes=1 << 20) > 0


# ----------------------------------------------------------------------------- kernel_speed.py


def _recurrence_float64(q, k, v, g, scale):
    """S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, one token at a time, float64."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    out = []
    for t in range(T):
        S = g[:, t].exp()[..., None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * (q[:, t, :, None, :] @ S).squeeze(-2))
    return torch.stack(out, dim=1)


def test_float64_reference_matches_the_recurrence():
    """The benchmark's own check is only as good as its float64 reference: o and every gradient
    against a token-by-token recurrence (odd T, per-token decay, B and H > 1)."""
    B, T, H, K, V = 2, 70, 3, 8, 5
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v, do = torch.randn(B, T, H, V), torch.randn(B, T, H, V)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H))
    got = kernel_speed.reference_grads_float64(q, k, v, g, do, 0.5, grad_g=True)
    leaves = [x.double().requires_grad_() for x in (q, k, v, g)]
    o = _recurrence_float64(*leaves, 0.5)
    grads = torch.autograd.grad(o, leaves, do.double())
    for name, want in zip(("o", "dq", "dk", "dv", "dg"), (o,) + grads):
        assert got[name].dtype == torch.float64
        assert common.relative_error(got[name], want) < 1e-10, name


def test_sdpa_rows_reference_matches_full_attention():
    B, H, T, D = 1, 2, 40, 8
    q, k, v, do = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(4))
    qg = q.clone().requires_grad_()
    o = torch.nn.functional.scaled_dot_product_attention(qg, k, v, is_causal=True)
    (dq,) = torch.autograd.grad(o, qg, do)
    rows = kernel_speed.sdpa_rows_float64(q, k, v, do, 7)
    assert common.relative_error(rows["o"], o[:, :, -7:]) < 1e-12
    assert common.relative_error(rows["dq"], dq[:, :, -7:]) < 1e-12


def test_memory_floor_bytes():
    got = kernel_speed.chunk_bytes(B=2, T=10, H=3, K=4, V=5, element=2, token_decay=False)
    tokens = 2 * 10 * 3
    assert got["fwd"] == tokens * (4 + 4 + 5 + 5) * 2  # q, k, v in; o out
    assert (
        got["fwd+bwd"] == got["fwd"] + tokens * (4 + 4 + 5 + 5 + 4 + 4 + 5) * 2
    )  # q, k, v, do in; dq, dk, dv out
    with_g = kernel_speed.chunk_bytes(B=2, T=10, H=3, K=4, V=5, element=2, token_decay=True)
    assert with_g["fwd+bwd"] - got["fwd+bwd"] == 3 * tokens * 4  # g in (twice), dg out


def test_slopes_are_transnormer_decays():
    s = kernel_speed.slopes(16)
    assert s[0].item() == pytest.approx(2**-0.5) and s[-1].item() == pytest.approx(2**-8)
    assert bool((s[1:] < s[:-1]).all())


def _cpu_run(backend="torch"):
    return kernel_speed.Run(
        torch.device("cpu"), torch.bfloat16, backend, tiny=True, bandwidth_gbps=10.0, warmup_ms=1, rep_ms=1
    )


def test_wrong_provider_is_failed_and_gets_no_ratio(monkeypatch):
    """A peer whose output is 10% off is marked FAILED; no row is compared with it."""

    def prepare_wrong(run, x):
        ours = kernel_speed.prepare_lasp_hf(run, x)
        return kernel_speed.Prepared(
            lambda: ours.forward() * 1.1, ours.leaves, ours.do, grad_names=ours.grad_names
        )

    providers = [
        kernel_speed.Provider("lasp_hf", kernel_speed.prepare_lasp_hf, ("head", "token")),
        kernel_speed.Provider("fla", prepare_wrong, ("head", "token")),
    ]
    monkeypatch.setattr(kernel_speed, "PROVIDERS", providers)

    def one_call(fn, device, warmup_ms=0, rep_ms=0):
        fn()
        return 1.0

    monkeypatch.setattr(kernel_speed.common, "bench_ms", one_call)
    rows = kernel_speed.chunk(_cpu_run(), "chunk-B1-H16-T8K", B=1, H=16, T=8192)
    assert {(r["decay"], r["mode"]) for r in rows} == {
        (d, m) for d in ("head", "token") for m in ("fwd", "fwd+bwd")
    }
    for row in rows:
        assert row["T"] == 131 and row["K"] == 32  # the --tiny stand-in shape
        if row["provider"] == "fla":
            assert row["status"] == "FAILED" and row["err"] == pytest.approx(0.1, rel=0.05)
        else:
            assert row["status"] == "ok" and row["err"] < 2e-2
        assert "t_vs_fla" not in row


def test_fla_calls_match_fla_signatures(monkeypatch):
    """prepare_fla's three calls (chunk_simple_gla with g_gamma or g, chunk_gla) run against stand-ins with fla's
    signatures (fla itself needs CUDA) that compute the op with lasp_hf: every fla row is checked and timed."""
    import types

    import lasp_hf

    def op(q, k, v, g, scale):
        return lasp_hf.linear_attention(q, k, v, g, scale=scale, backend="torch")[0], None

    def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None):
        assert (g is None) != (g_gamma is None)
        return op(q, k, v, g_gamma if g is None else g, scale)

    def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
        assert g.shape == k.shape
        return op(q, k, v, g, scale)

    for name, attrs in {"fla": {}, "fla.ops": {}, "fla.ops.simple_gla": {"chunk_simple_gla": chunk_simple_gla},
                        "fla.ops.gla": {"chunk_gla": chunk_gla}}.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    monkeypatch.setattr(kernel_speed, "PROVIDERS",
                        [kernel_speed.Provider("fla", kernel_speed.prepare_fla, ("head", "token", "channel"))])

    def one_call(fn, device, warmup_ms=0, rep_ms=0):
        fn()
        return 1.0

    monkeypatch.setattr(kernel_speed.common, "bench_ms", one_call)
    run = _cpu_run()
    run.decays = ("head", "token", "channel")
    rows = kernel_speed.chunk(run, "chunk-B1-H16-T8K", B=1, H=16, T=8192)
    assert {(r["decay"], r["mode"]) for r in rows} == {
        (d, m) for d in ("head", "token", "channel") for m in ("fwd", "fwd+bwd")
    }
    for row in rows:
        assert row["status"] == "ok" and row["ms"] == 1.0, row
        assert row["err"] < 2e-2


def test_ratio_only_between_passing_rows():
    rows = [
        dict(case="c", decay="head", mode="fwd", provider="fla", status="ok", ms=2.0),
        dict(case="c", decay="head", mode="fwd", provider="lasp_hf", status="ok", ms=1.0),
        dict(case="c", decay="head", mode="fwd+bwd", provider="fla", status="ok", ms=4.0),
        dict(case="c", decay="head", mode="fwd+bwd", provider="lasp_hf", status="FAILED", ms=1.0),
    ]
    kernel_speed._add_ratios(rows)
    assert rows[1]["t_vs_fla"] == 0.5 and rows[0]["t_vs_fla"] == 1.0
    assert "t_vs_fla" not in rows[3]


def test_kernels_dry_run_lists_the_issue_cases():
    out = _run([str(BENCH_DIR / "kernel_speed.py"), "--dry-run"]).stdout.split()
    names = [w for w in out if w.startswith(("chunk-", "decode-"))]
    assert names == [
        "chunk-B1-H16-T4K",
        "chunk-B1-H16-T8K",
        "chunk-B1-H16-T32K",
        "chunk-B1-H16-T128K",
        "chunk-B8-H32-T4K",
        "chunk-B8-H32-T16K",
        "decode-B1-H16",
        "decode-B64-H16",
    ]


def test_kernels_cpu_tiny_run_writes_results(tmp_path):
    _run(
        [
            str(BENCH_DIR / "kernel_speed.py"),
            "--cpu",
            "--tiny",
            "--cases",
            "chunk-B8-H32-T4K",
            "decode-B1-*",
            "--out",
            str(tmp_path),
        ],
        env_extra={"LASP_HF_COMMIT": "abc123"},
    )
    data = json.loads((tmp_path / "kernels-cpu-tiny.json").read_text())
    assert (
        data["env"]["commit"] == "abc123" and data["backend"] == "torch" and data["copy_bandwidth_gbps"] > 0
    )
    rows = {(r["case"], r["decay"], r["mode"], r["provider"]): r for r in data["rows"]}
    for mode in ("fwd", "fwd+bwd"):
        for decay in ("head", "token"):
            ours = rows[("chunk-B8-H32-T4K", decay, mode, "lasp_hf")]
            assert ours["status"] == "ok" and ours["err"] < 2e-2 and ours["ms"] > 0 and ours["floor_ms"] > 0
            assert rows[("chunk-B8-H32-T4K", decay, mode, "fla")]["status"] == "SKIP"  # peers need CUDA
        assert rows[("chunk-B8-H32-T4K", "head", mode, "sdpa")]["status"] == "ok"
    decode = rows[("decode-B1-H16", "head", "decode", "lasp_hf")]
    assert decode["status"] == "ok" and decode["errors"]["state"] < 1e-6 and decode["us"] > 0
    assert (tmp_path / "kernels-cpu-tiny.md").read_text().count("| chunk-B8-H32-T4K |") == 12


# ----------------------------------------------------------------------------- sp_scaling.py


def test_comm_bytes_per_layer():
    state = 1 * 16 * 128 * 128 * 4
    assert sp_scaling.comm_bytes("ring", 4, 1, 16, 128, 128) == {"per_rank": 2 * state, "total": 6 * state}
    assert sp_scaling.comm_bytes("ring", 2, 1, 16, 128, 128) == {"per_rank": state, "total": 2 * state}
    entry = state + 16 * 4
    assert sp_scaling.comm_bytes("allgather", 4, 1, 16, 128, 128) == {
        "per_rank": 6 * entry,
        "total": 24 * entry,
    }
    assert sp_scaling.comm_bytes("single", 4, 1, 16, 128, 128)["total"] == 0


def test_gla_tune_cpu_tiny_in_the_interpreter(tmp_path):
    # The GLA Triton kernels run on CPU tensors only in Triton's interpreter: two settings (16- and 32-token
    # steps), each timed and checked against the float32 PyTorch reference.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "gla_tune.py"), "--cpu", "--tiny", "--steps", "16", "32", "--fwd-bv", "128",
         "--bwd-bk", "32", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, check=False, cwd=BENCH_DIR.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gla-tune-cpu.json").read_text())["rows"]
    assert [row["setting"].split()[0] for row in rows] == ["steps=16", "steps=32"]
    for row in rows:
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        assert max(row[f"err_{name}"] for name in ("o", "dq", "dk", "dv", "dg")) < 1e-4, row
    assert "| setting |" in (tmp_path / "gla-tune-cpu.md").read_text()


def test_gla_tune_fla_only_is_fla_alone_and_fla_comes_first():
    # fla's first call autotunes for minutes: --fla-only gives it a run of its own; --fla puts it before the grid.
    alone = _run([str(BENCH_DIR / "gla_tune.py"), "--cpu", "--fla-only", "--dry-run"]).stdout.splitlines()
    assert alone == ["{'fla': True, 'K': 128}"]
    grid = _run([str(BENCH_DIR / "gla_tune.py"), "--cpu", "--fla", "--dry-run", "--steps", "16", "--fwd-bv", "128",
                 "--bwd-bk", "64", "--split-state", "1", "0"]).stdout.splitlines()
    assert grid[0] == "{'fla': True, 'K': 128}" and len(grid) == 3 and "'split_state': 0" in grid[2]


def test_gla_step_ablation_cpu_tiny_in_the_interpreter(tmp_path):
    # Every variant of the stand-alone GLA scan step runs (Triton's interpreter) and writes its table; the "full"
    # variant's output equals the float64 statement of the output scan it mirrors.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "gla_step_ablation.py"), "--cpu", "--tiny", "--steps", "32", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, check=False, cwd=BENCH_DIR.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gla-step-ablation-cpu.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == ["full", "no-cumsum", "no-exp", "no-g", "no-split", "no-A", "bare"]
    assert all(row["ms"] > 0 and row["finite"] for row in rows)


def test_gla_step_ablation_full_variant_is_the_output_scan():
    """In the interpreter subprocess: the ablation kernel's "full" variant against float64 o = A v + (q exp(b)) S,
    S = diag(exp(b_last)) S + (k exp(b_last - b))^T v per step, from a zero state per segment."""
    code = """
import sys, torch
sys.path.insert(0, "benchmarks")
import gla_step_ablation as ab
torch.manual_seed(0)
T, H, K, BT, SEG = 128, 2, 32, 32, 64
t = {n: torch.randn(T, H, K) for n in ("q", "k", "v")}
t["g"] = torch.nn.functional.logsigmoid(torch.randn(T, H, K)) / 4
t["A"] = torch.randn(T, H, BT)
t["o"] = torch.empty(T, H, K)
out = ab.run_variant(t, "full", SEG, BT).double()
q, k, v, g, A = (t[n].double() for n in ("q", "k", "v", "g", "A"))
ref = torch.empty_like(out)
for s0 in range(0, T, SEG):
    S = torch.zeros(H, K, K, dtype=torch.float64)
    for t0 in range(s0, s0 + SEG, BT):
        sl = slice(t0, t0 + BT)
        b = g[sl].cumsum(0)
        scores = A[sl].permute(1, 0, 2).tril()
        intra = scores @ v[sl].permute(1, 0, 2)
        inter = (q[sl] * b.exp()).permute(1, 0, 2) @ S
        ref[sl] = (intra + inter).permute(1, 0, 2)
        kd = k[sl] * (b[-1:] - b).exp()
        S = S * b[-1].exp()[:, :, None] + kd.permute(1, 2, 0) @ v[sl].permute(1, 0, 2)
err = ((out - ref).norm() / ref.norm()).item()
assert err < 1e-4, err
print("ok", err)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          check=False, cwd=BENCH_DIR.parent)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles, does not interpret")
def test_gla_step_ablation_compiles_for_sm90():
    """Every variant at the benchmark's shape (bf16, K = V = 128, 64- and 16-token steps, 8 warps) compiles for an
    H100 and fits its shared memory."""
    pytest.importorskip("triton")
    import triton.language as tl
    from sm90_compile import SM90_SHARED_BYTES, compile_for_sm90

    sys.path.insert(0, str(BENCH_DIR))
    import gla_step_ablation as ab

    for steps in (64, 16):
        for name, (g_source, use_exp, split, load_a) in ab.VARIANTS.items():
            constexprs = dict(SEG=1024, H=16, K=128, V=128, BT=steps, DT=tl.bfloat16, G_SOURCE=g_source, EXP=use_exp,
                              SPLIT=split, LOAD_A=load_a)
            # (compile_for_sm90 takes a kernel's .fn: the JIT function of a `launch.fast` wrapper)
            compiled = compile_for_sm90(types.SimpleNamespace(fn=ab._step_kernel), constexprs, 8)
            assert compiled.metadata.shared <= SM90_SHARED_BYTES, (name, steps, compiled.metadata.shared)


def test_decode_linear_cpu_tiny_in_the_interpreter(tmp_path):
    # The fused decoding projections against the plain ops on CPU tensors (Triton's interpreter): every projection,
    # one row and several, two tile settings; each checked against the plain ops before it is timed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "decode_linear.py"), "--cpu", "--tiny", "--bn", "0", "16", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, check=False, cwd=BENCH_DIR.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "decode-linear-cpu-tiny.json").read_text())["rows"]
    assert [(row["projection"], row["B"], row["bn"]) for row in rows] == [
        (p, B, bn) for p in ("qkvu", "o_proj", "glu", "down") for B in (1, 32) for bn in ("auto", 16)
    ]
    for row in rows:
        assert row["err"] < 1e-5 and row["fused_us"] > 0 and row["plain_us"] > 0, row
    assert "| projection |" in (tmp_path / "decode-linear-cpu-tiny.md").read_text()


@pytest.mark.distributed
def test_sp_scaling_cpu_tiny_two_gloo_ranks(tmp_path):
    """One torchrun launch, 2 gloo ranks: the unsharded baseline, ring and allgather pass their
    check against the unsharded op (float32, 1e-4) and get an efficiency; lasp-ref is skipped."""
    _run(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(BENCH_DIR / "sp_scaling.py"),
         "--cpu", "--tiny", "--cases", "sp-T8K", "--out", str(tmp_path)],
        timeout=180,
    )
    data = json.loads((tmp_path / "sp-cpu-W2-tiny.json").read_text())
    assert data["world_size"] == 2 and data["tolerance"] == 1e-4
    rows = {r["provider"]: r for r in data["rows"]}
    assert rows["lasp-ref"]["status"] == "SKIP"
    for provider in ("single", "ring", "allgather"):
        row = rows[provider]
        assert row["status"] == "ok" and row["err"] <= 1e-4, row
        assert row["T_local"] == 65 and row["T_total"] == 130 and len(row["rank_ms"]) == 2
        # the median over loops of the slowest rank is at least every rank's own median
        assert row["ms"] >= max(row["rank_ms"]) - 1e-9
        # on CPU issuing a step is the step: the host time is the step's time, measured the same way
        assert row["host_ms"] == pytest.approx(row["ms"])
    for provider in ("ring", "allgather"):
        assert rows[provider]["efficiency"] == pytest.approx(rows["single"]["ms"] / rows[provider]["ms"])
        assert rows[provider]["tokens_per_s"] == pytest.approx(2 * 65 / (rows[provider]["ms"] * 1e-3))
    assert rows["ring"]["comm_mb_per_rank"] == pytest.approx(2 * 16 * 16 * 4 / 2**20)
    assert "| sp-T8K | 2 | ring |" in (tmp_path / "sp-cpu-W2-tiny.md").read_text()


def test_sp_ratios_only_between_passing_rows():
    """eff = single's time over the row's; vs lasp = tokens/s over lasp-ref's; a FAILED row gets none and gives
    none."""
    rows = [
        {"provider": "single", "status": "ok", "ms": 1.0, "tokens_per_s": 10.0},
        {"provider": "ring", "status": "ok", "ms": 2.0, "tokens_per_s": 20.0},
        {"provider": "allgather", "status": "FAILED", "ms": 1.0, "tokens_per_s": 40.0},
        {"provider": "lasp-ref", "status": "ok", "ms": 4.0, "tokens_per_s": 5.0},
    ]
    sp_scaling._add_ratios(rows)
    single, ring, allgather, lasp_ref = rows
    assert ring["efficiency"] == 0.5 and ring["vs_lasp"] == 4.0
    assert lasp_ref["efficiency"] == 0.25 and "vs_lasp" not in lasp_ref
    assert "efficiency" not in allgather and "vs_lasp" not in allgather and "efficiency" not in single
    rows[3]["status"] = "FAILED"
    del ring["vs_lasp"]
    sp_scaling._add_ratios(rows)
    assert "vs_lasp" not in ring  # no ratio to a reference that failed its check


def test_sp_layer_stack_chains_layers_like_a_model():
    """--layers: layer l takes layer l-1's output as its queries and its own k, v; one backward call gives the
    gradients of every layer's leaves, as autograd through the written-out chain does."""
    import torch

    torch.manual_seed(0)
    q, k, v, up = (torch.randn(3, 4, dtype=torch.float64) for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def forward(q=leaves[0], k=leaves[1], v=leaves[2]):
        return torch.tanh(q * k) + v

    grads = sp_scaling.layer_stack(forward, leaves, up, 3)()
    assert len(grads) == 3 + 2 * 2
    # The same chain written out, from fresh leaves with the same values.
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v, k, v, k, v)]
    o = torch.tanh(ref[0] * ref[1]) + ref[2]
    o = torch.tanh(o * ref[3]) + ref[4]
    o = torch.tanh(o * ref[5]) + ref[6]
    for got, want in zip(grads, torch.autograd.grad(o, ref, up)):
        torch.testing.assert_close(got, want)


def test_sp_rejects_bad_counts():
    with pytest.raises(ValueError, match="--repeats must be at least 1, got 0"):
        sp_scaling.parse_args(["--repeats", "0"])
    with pytest.raises(ValueError, match="--layers must be at least 1, got 0"):
        sp_scaling.parse_args(["--layers", "0"])


def test_kernels_provider_selection():
    assert kernel_speed.parse_providers("ours") == ("lasp_hf",)
    assert kernel_speed.parse_providers("ours, fla,lasp,sdpa") == ("lasp_hf", "fla", "lasp-ref", "sdpa")
    assert kernel_speed.parse_args([]).providers == ("lasp_hf", "fla", "lasp-ref", "sdpa")
    with pytest.raises(ValueError, match="unknown: flash"):
        kernel_speed.parse_providers("ours,flash")
    with pytest.raises(ValueError, match="expected a comma-separated subset"):
        kernel_speed.parse_providers(",")


def test_kernels_runs_only_the_chosen_providers(tmp_path):
    """--providers ours: only our rows, and a progress line before each provider's call."""
    proc = _run(
        [
            str(BENCH_DIR / "kernel_speed.py"),
            "--cpu",
            "--tiny",
            "--cases",
            "chunk-B1-H16-T4K",
            "decode-B1-*",
            "--providers",
            "ours",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "kernels-cpu-tiny.json").read_text())
    assert {r["provider"] for r in data["rows"]} == {"lasp_hf"}
    assert all(r["status"] == "ok" for r in data["rows"])
    assert len(data["rows"]) == 5  # head and token x fwd and fwd+bwd, and one decode row
    for line in (
        "[kernels] chunk-B1-H16-T4K head: lasp_hf",
        "[kernels] chunk-B1-H16-T4K token: lasp_hf",
        "[kernels] decode-B1-H16: lasp_hf",
    ):
        assert line in proc.stderr
    assert "sdpa" not in proc.stderr and ": fla" not in proc.stderr


def _run_device(part: str, out: Path, **env) -> None:
    """run_device.sh PART on this machine (no install; this venv's python3 first on PATH), results under out."""
    venv_bin = str(Path(sys.executable).parent)
    proc = subprocess.run(
        ["bash", str(BENCH_DIR / "run_device.sh"), part], capture_output=True, text=True, timeout=180, check=False,
        cwd=BENCH_DIR.parent,
        env={**os.environ, "PATH": venv_bin + os.pathsep + os.environ["PATH"], "OUT": str(out), "SKIP_INSTALL": "1",
             "LASP_HF_COMMIT": "abc123", **env},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.distributed
def test_run_device_sp_part_writes_few_files(tmp_path):
    """run_device.sh sp (CPU stand-in via SP_ARGS): one log, the JSON, and summary.md holding the exit status and
    the table that was the .md."""
    out = tmp_path / "out"
    _run_device("sp", out, SP_WORLDS="2", OMP_NUM_THREADS="1", SP_ARGS="--cpu --tiny --cases sp-T8K")
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["run-device.log", "sp-cpu-W2-tiny.json",
                                                                     "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "sp-W2: exit 0" in summary and "<!-- sp-cpu-W2-tiny.md -->" in summary
    assert "| sp-T8K | 2 | ring |" in summary and "commit abc123" in summary
    assert "=== sp-W2:" in (out / "run-device.log").read_text()
    rows = {r["provider"]: r for r in json.loads((out / "sp-cpu-W2-tiny.json").read_text())["rows"]}
    assert rows["ring"]["ms"] > 0 and rows["ring"]["efficiency"] > 0


def test_run_device_tests_part_runs_files_side_by_side(tmp_path):
    """run_device.sh tests: every file gets its own pytest and exit status (a failing one too), the logs join the
    main log in the files' order, and no per-file scratch file is left behind."""
    (tmp_path / "test_fails.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_x():\n    assert False\n")
    (tmp_path / "test_passes.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_y():\n    pass\n")
    files = [str(tmp_path / "test_passes.py"), str(tmp_path / "test_fails.py")]
    out = tmp_path / "out"
    _run_device("tests", out, TEST_FILES=" ".join(files), TEST_STREAMS="2")
    assert sorted(p.name for p in out.iterdir()) == ["run-device.log", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "- pytest-test_passes: exit 0" in summary and "- pytest-test_fails: exit 1" in summary
    log = (out / "run-device.log").read_text()
    assert log.index("=== pytest-test_passes") < log.index("=== pytest-test_fails") < log.index("1 failed")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_timing_and_bandwidth():
    x = torch.randn(1 << 20, device="cuda")
    ms = common.bench_ms(lambda: x.mul_(1.0), "cuda")
    assert 0 < ms < 10
    assert common.copy_bandwidth_gbps("cuda", nbytes=256 << 20) > 100


@pytest.mark.distributed
def test_train_parity_cpu_two_processes(tmp_path):
    """benchmarks/train_parity.py: SP=1 and SP=2 runs of train_clm on CPU log the same losses."""
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "train_parity.py"), "--cpu", "--world", "2", "--steps", "3",
         "--block_size", "64", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "train-parity-cpu-W2.json").read_text())
    assert len(data["rows"]) == 3
    assert data["runs"]["default_sp2"]["status"] == "ok"
    assert data["runs"]["default_sp2"]["max_rel_diff"] < 1e-4
    assert max(row["rel_diff"] for row in data["rows"]) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-parity-cpu-W2.json", "train-parity-cpu-W2.md"]


def test_train_mfu_cpu_two_processes(tmp_path):
    """benchmarks/train_mfu.py: one row per (config, checkpointing), the steady-state mean after --skip, the profile."""
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "train_mfu.py"), "--cpu", "--world", "2", "--model_config",
         str(BENCH_DIR.parent / "recipes/configs/tnl-tiny.json"), "--tokens_per_gpu", "32", "--steps", "3", "--skip",
         "1", "--accelerate_config", str(BENCH_DIR.parent / "recipes/accelerate/cpu_sp2.yaml"), "--checkpointing",
         "on", "off", "--profile_steps", "2", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "train-mfu-cpu-W2.json").read_text())
    assert [row["run"] for row in data["rows"]] == ["cpu_sp2-ckpt-on", "cpu_sp2-ckpt-off"]
    for row in data["rows"]:
        assert row["status"] == "ok" and row["steps_averaged"] == 2
        assert row["tokens_per_second"] > 0 and row["tokens_per_second_per_gpu"] == row["tokens_per_second"] / 2
        assert row["mfu"] is None  # no bf16 peak for a CPU
    assert data["peak_tflops"] is None
    assert "training steps 2..2" in (tmp_path / "train-mfu-cpu-profile.txt").read_text()
    assert (tmp_path / "train-mfu-cpu-W2.md").exists()


def test_train_mfu_one_process_several_lengths(tmp_path):
    """benchmarks/train_mfu.py --world 1 without a config: a plain launch, one row per tokens-per-GPU value."""
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "train_mfu.py"), "--cpu", "--world", "1", "--model_config",
         str(BENCH_DIR.parent / "recipes/configs/tnl-tiny.json"), "--tokens_per_gpu", "32", "64", "--steps", "3",
         "--skip", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "train-mfu-cpu-W1.json").read_text())
    assert [(row["run"], row["tokens_per_gpu"], row["config"]) for row in data["rows"]] == [
        ("single-ckpt-on-T32", 32, None), ("single-ckpt-on-T64", 64, None)]
    for row in data["rows"]:
        assert row["status"] == "ok" and row["steps_averaged"] == 2 == len(row["tokens_per_second_per_step"])
        assert row["tokens_per_second"] > 0 and row["tokens_per_second_per_gpu"] == row["tokens_per_second"]
        low, high = sorted(row["tokens_per_second_per_step"])
        assert row["tokens_per_second"] == row["tokens_per_second_mean"] == (low + high) / 2  # median of two


def test_train_mfu_needs_a_config_where_there_is_no_default(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "train_mfu.py"), "--cpu", "--world", "3", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode != 0
    assert "no default accelerate config for --world 3" in result.stderr and "ddp_sp3.yaml" in result.stderr
    assert not list(tmp_path.iterdir())


def test_train_mfu_card_peaks():
    sys.path.insert(0, str(BENCH_DIR))
    import train_mfu

    assert train_mfu.card_peak("NVIDIA H100 80GB HBM3") == 989.4
    assert train_mfu.card_peak("NVIDIA H200") == 989.4
    assert train_mfu.card_peak("cpu") is None
