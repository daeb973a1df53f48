"""How the Triton op cuts the token axis into segments (`chunk._make_plan`), for an H100's 132 SMs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lasp_hf.kernels.triton import chunk  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(chunk, "_num_sms", lambda device: 132)
    monkeypatch.setattr(chunk, "CHUNKS_PER_SEGMENT", None)
    monkeypatch.setattr(chunk, "PROGRAMS_PER_SM", 4)
    monkeypatch.setattr(chunk, "MAX_IMBALANCE", 4)


def _segments(plan):
    return list(zip(plan.seg_bos.tolist(), plan.seg_eos.tolist(), strict=True))


def _check_cover(plan, bounds):
    """Segments tile every sequence in order, none crosses a sequence boundary or exceeds cps chunks."""
    segs = _segments(plan)
    assert [a for a, _ in segs][0] == bounds[0] and segs[-1][1] == bounds[-1]
    for (a, b), (c, _) in zip(segs, segs[1:]):
        assert b == c
    starts = set(bounds)
    for a, b in segs:
        assert 0 < b - a <= plan.chunks_per_segment * chunk.CHUNK_SIZE
        assert not any(a < s < b for s in starts)


def test_one_long_row_is_cut_to_fill_the_device(h100):
    plan = chunk._make_plan([0, 32768], 16, 1, CPU)   # B=1, H=16: 16 programs for 132 SMs
    assert plan.chunks_per_segment == 16 and plan.num_segs == 32
    _check_cover(plan, [0, 32768])


def test_a_full_batch_keeps_one_segment_per_row(h100):
    bounds = [b * 16384 for b in range(9)]            # B=8, H=32: 256 programs already fill the device
    plan = chunk._make_plan(bounds, 32, 1, CPU)
    assert plan.max_segs == 1 and plan.num_segs == 8


def test_one_long_document_among_short_ones_is_cut(h100):
    # 96 documents of 1K tokens and one of 32K: (document, head) programs fill the device, but the long one
    # alone would be a serial scan 8x longer than the average work per program slot.
    bounds = [0, 32768] + [32768 + 1024 * (i + 1) for i in range(96)]
    plan = chunk._make_plan(bounds, 16, 1, CPU)
    per_slot = -(-(512 + 96 * 16) * 16 // (4 * 132))
    assert plan.chunks_per_segment <= per_slot
    assert plan.max_segs == -(-512 // plan.chunks_per_segment)
    assert plan.num_segs == plan.max_segs + 96        # short documents stay whole
    _check_cover(plan, bounds)


def test_similar_documents_are_not_cut(h100):
    bounds = [i * 2048 for i in range(65)]            # 64 documents of 2K, H=16
    plan = chunk._make_plan(bounds, 16, 1, CPU)
    assert plan.max_segs == 1 and plan.num_segs == 64


def test_launch_settings_with_step_tokens(monkeypatch):
    # A phase's settings may carry a fourth entry (tokens per step): the launch options are still warps and stages.
    monkeypatch.setattr(chunk, "interpreting", lambda: False)
    monkeypatch.setitem(chunk.CONFIGS, "fwd_state", (16384, 4, 3, 128))
    assert chunk._config("fwd_state", torch.bfloat16, 128, torch.device("cpu")) == {"num_warps": 4, "num_stages": 3}
    monkeypatch.setitem(chunk.CONFIGS, "fwd", (16384, 8, 3))
    assert chunk._step_tokens("fwd_state") == 128
    assert chunk._step_tokens("fwd") == chunk.CHUNK_SIZE
    # 128-token steps only where their tiles fit shared memory: 16-bit inputs, K blocks up to 128.
    assert chunk._step_tokens("fwd_state", torch.float16, 128) == 128
    assert chunk._step_tokens("fwd_state", torch.float32, 128) == chunk.CHUNK_SIZE
    assert chunk._step_tokens("fwd_state", torch.bfloat16, 256) == chunk.CHUNK_SIZE


def test_launch_setup_follows_settings_changed_at_run_time(monkeypatch):
    # The launchers' settings are computed once per combination; CONFIGS and the float32 precision (changed by
    # benchmarks and tests while the process runs) are part of what is looked up.
    monkeypatch.setattr(chunk, "interpreting", lambda: False)
    monkeypatch.setattr(chunk.triton, "set_allocator", lambda allocator: None)
    q = torch.empty(64, 2, 128, dtype=torch.bfloat16)
    plan = chunk._make_plan([0, 64], 2, 1, CPU)
    for warps, tokens in ((8, 128), (4, 64), (8, 128)):
        monkeypatch.setitem(chunk.CONFIGS, "fwd", (16384, warps, 2, tokens))
        *_, cfg, meta, scan = chunk._launch_setup(q, q, None, plan, "fwd", False)
        assert cfg == {"num_warps": warps, "num_stages": 2} and scan["BT"] == tokens and meta["BV"] == 128
    q32 = q.float()
    for precision in ("ieee", "tf32x3"):
        monkeypatch.setattr(chunk, "FP32_DOT_PRECISION", precision)
        *_, cfg, meta, scan = chunk._launch_setup(q32, q32, None, plan, "fwd", False)
        assert scan["DOT_PREC"] == precision and scan["BT"] == chunk.CHUNK_SIZE and cfg["num_stages"] == 1
