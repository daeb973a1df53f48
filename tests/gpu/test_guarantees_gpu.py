"""The GPU side of the guarantees (tests/test_guarantees_*.py hold the CPU side):

- g = -inf restarts the state exactly in the Triton kernels at real shapes (float64 chunked reference with the
  restarts applied as document boundaries would: the recurrence itself, exp(-inf) = 0);
- g > 0 / NaN g and input ids outside the vocabulary on CUDA tensors fail through an asynchronous device assert
  (no host sync), with the message, at a later CUDA call (run in a subprocess: a device assert ends the CUDA
  context);
- a stuck peer on the direct NCCL path ends in an error within the SP group's timeout (2 GPUs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lasp_hf
from triton_reference64 import rel_err, recurrence64

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kind", ["token", "head"])
def test_triton_restarts_exactly(kind):
    B, T, H, K, V = 1, 700, 4, 64, 64  # the float64 recurrence is token by token: keep T moderate
    dev = "cuda"
    q, k, v = (torch.randn(B, T, H, D, device=dev) for D in (K, K, V))
    k = k * K ** -0.5
    if kind == "token":
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev) + 3.0)
        g[:, ::97] = float("-inf")
        g[:, 128] = float("-inf")  # at a chunk start
        g[0, 300:302, 1] = -30.0
    else:
        g = torch.tensor([float("-inf"), -0.01, -30.0, -0.5], device=dev)
    h0 = torch.randn(B, H, K, V, device=dev)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, final = lasp_hf.linear_attention(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                        backend="triton")
    do = torch.randn_like(o, dtype=torch.float64)
    dS = torch.randn_like(final, dtype=torch.float64)
    ((o.double() * do).sum() + (final.double() * dS).sum()).backward()
    refs = [x.detach().double().requires_grad_() for x in (q, k, v, g, h0)]
    o_ref, s_ref = recurrence64(*refs[:4], K ** -0.5, refs[4])
    ((o_ref * do).sum() + (s_ref * dS).sum()).backward()
    errors = {"o": rel_err(o, o_ref), "final": rel_err(final, s_ref)}
    for name, x, ref in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, refs):
        assert torch.isfinite(x.grad).all(), name
        errors[name] = rel_err(x.grad, ref.grad)
    bad = {name: err for name, err in errors.items() if not err <= 1e-4}
    assert not bad, (bad, errors)


def _run_snippet(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.parametrize("bad", ["0.5", "float('nan')"])
def test_positive_or_nan_decay_fails_through_a_device_assert(bad):
    """The check itself never waits for the GPU (a call with a valid g of the same shape runs under
    `set_sync_debug_mode("error")`); a bad value then fails the process with the message at a later CUDA call
    (which one depends on when the assert kernel has run: it can be a launch inside the op's next call)."""
    run = _run_snippet(f"""
        import torch, lasp_hf
        q = torch.randn(1, 256, 2, 64, device="cuda")
        g = torch.full((1, 256, 2), -0.1, device="cuda")
        lasp_hf.linear_attention(q, q, q, g)  # builds and caches the launch plan of this shape
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        lasp_hf.linear_attention(q, q, q, g)  # raises if the decay check (or anything else) syncs
        torch.cuda.set_sync_debug_mode("default")
        print("checked without a sync", flush=True)
        g[0, 200, 1] = {bad}
        lasp_hf.linear_attention(q, q, q, g)
        torch.cuda.synchronize()
        print("no error", flush=True)
    """)
    assert "checked without a sync" in run.stdout, run.stdout + run.stderr[-3000:]
    assert run.returncode != 0 and "no error" not in run.stdout, run.stdout + run.stderr[-3000:]
    assert "natural-log decay" in run.stderr, run.stderr[-3000:]


def test_input_ids_outside_the_vocabulary_fail_through_a_device_assert():
    run = _run_snippet("""
        import torch, lasp_hf
        model = lasp_hf.LaspForCausalLM(lasp_hf.LaspConfig(vocab_size=32, hidden_size=64, num_hidden_layers=1,
                                                           num_attention_heads=4, head_dim=16, intermediate_size=128))
        model.cuda()
        ids = torch.randint(0, 32, (1, 64), device="cuda")
        ids[0, 5] = 40
        model(input_ids=ids)
        torch.cuda.synchronize()
        print("no error", flush=True)
    """)
    assert "no error" not in run.stdout and "outside [0, vocab_size = 32)" in run.stderr, run.stderr[-3000:]


def _stuck_peer_worker() -> dict:
    import torch.distributed as dist

    sp = lasp_hf.init_sequence_parallel(2)  # inherits the 5 s timeout of the default group
    assert sp.direct is not None and sp.direct.watchdog is not None
    q = torch.randn(1, 128, 2, 64, device="cuda")
    lasp_hf.linear_attention(q, q, q, sp_group=sp, sp_mode="allgather")  # both ranks: shapes checked, comm warm
    torch.cuda.synchronize()
    if dist.get_rank() == 1:
        time.sleep(25)  # alive, but never joins the next exchange
        return {"rank": 1}
    start = time.monotonic()
    error = None
    try:
        # The all_gather of the states needs rank 1, which never comes: it cannot complete.
        for _ in range(3):
            lasp_hf.linear_attention(q, q, q, sp_group=sp, sp_mode="allgather")
            torch.cuda.synchronize()
            sp.direct.check()
    except RuntimeError as err:
        error = str(err)
    return {"rank": 0, "error": error, "waited_s": time.monotonic() - start}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_stuck_peer_on_the_direct_nccl_path_ends_in_an_error_within_the_timeout():
    from distributed_utils import run_distributed

    results = run_distributed(_stuck_peer_worker, 2, backend="nccl", timeout_s=5.0)
    waiting = results[0]
    assert waiting["error"] is not None and "did not complete within" in waiting["error"], waiting
    assert waiting["waited_s"] < 20, waiting
