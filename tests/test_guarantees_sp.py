"""Sequence-parallel ranks that disagree, and ranks that stop answering (gloo, W = 2).

- Ranks passing different cu_seqlens (same shapes) get a ValueError on every rank. Before: no error, and a
  0.6 relative error in o at W = 2.
- The SP groups of `init_sequence_parallel` inherit the default group's timeout when given none (before:
  torch's 30-minute default), so a peer that is alive but stuck makes the others raise within it.
"""

import time

import pytest
import torch
import torch.distributed as dist

import lasp_hf
from distributed_utils import run_distributed


def _mismatched_cu_seqlens_worker(mode: str) -> str:
    rank = dist.get_rank()
    L, H, K = 16, 2, 8
    q = torch.randn(1, L, H, K)
    # The same number of documents (so equal shapes everywhere), different boundaries.
    same = torch.tensor([0, 16, 32], dtype=torch.int32)
    lasp_hf.linear_attention(q, q, q, cu_seqlens=same, sp_group=dist.group.WORLD, sp_mode=mode)  # agreed: runs
    cu = torch.tensor([0, 5, 32] if rank == 0 else [0, 20, 32], dtype=torch.int32)
    try:
        lasp_hf.linear_attention(q, q, q, cu_seqlens=cu, sp_group=dist.group.WORLD, sp_mode=mode)
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ring", "allgather"])
def test_ranks_with_different_cu_seqlens_are_refused(mode):
    messages = run_distributed(_mismatched_cu_seqlens_worker, 2, mode)
    for message in messages:
        assert "sequence-parallel ranks passed different cu_seqlens" in message, message
    assert "[0, 5, 32]" in messages[0] and "[0, 20, 32]" in messages[1]


def _timeout_worker() -> dict:
    """The default group has a 3 s timeout; rank 1 sleeps through a collective of the SP group."""
    from lasp_hf.parallel.context import group_timeout

    sp = lasp_hf.init_sequence_parallel(2)
    result = {"timeout_s": group_timeout(sp.group).total_seconds()}
    if dist.get_rank() == 1:
        time.sleep(8)
        return result
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=sp.group)
        result["error"] = None
    except RuntimeError as err:  # gloo's timeout
        result["error"] = str(err)[:200]
    result["waited_s"] = time.monotonic() - start
    return result


@pytest.mark.distributed
def test_sp_groups_inherit_the_default_timeout_and_a_stuck_peer_raises():
    results = run_distributed(_timeout_worker, 2, timeout_s=3.0)
    assert [r["timeout_s"] for r in results] == [3.0, 3.0]
    waiting = results[0]
    assert waiting["error"] is not None, waiting
    assert waiting["waited_s"] < 7.0, waiting  # the default group's 3 s, not 30 minutes
