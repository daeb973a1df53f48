"""Softmax attention under SP (LASP-2H) and the batch sharding helper, on W = 2 and 3 gloo processes.

sp_softmax_attention is checked against unsharded causal SDPA run document by document (forward
and the gradients of q, k, v); shard_batch_for_sp against labels shifted by hand on the full
sequence.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_utils import relative_error, run_distributed
from lasp_hf import SequenceParallelContext
from lasp_hf.parallel.attention import sp_softmax_attention
from lasp_hf.parallel.sharding import shard_batch_for_sp

TOL = 1e-4
H, H_KV, D = 4, 2, 8


def _reference_attention(q, k, v, bounds):
    """Causal SDPA on each document separately (GQA through repeat_interleave)."""
    k = k.repeat_interleave(H // H_KV, dim=2)
    v = v.repeat_interleave(H // H_KV, dim=2)
    outs = []
    for s, e in itertools.pairwise(bounds):
        if e > s:
            o = F.scaled_dot_product_attention(*(x[:, s:e].transpose(1, 2) for x in (q, k, v)), is_causal=True)
            outs.append(o.transpose(1, 2))
    return torch.cat(outs, dim=1)


def _attention_cases(W, rank, sp):
    L = 13
    T = W * L
    mine = slice(rank * L, (rank + 1) * L)
    errors = {}
    layouts = {"dense": None, "docs": [0, 4, L, L + 1, 2 * L + 3 if W > 2 else L + 5, T]}
    for name, bounds in layouts.items():
        gen = torch.Generator().manual_seed(7)
        B = 2 if bounds is None else 1
        q = torch.randn(B, T, H, D, generator=gen)
        k = torch.randn(B, T, H_KV, D, generator=gen)
        v = torch.randn(B, T, H_KV, D, generator=gen)
        w = torch.randn(B, T, H, D, generator=gen)
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        o_ref = _reference_attention(*ref_in, bounds if bounds is not None else [0, T])
        ref_grads = torch.autograd.grad((o_ref * w).sum(), ref_in)
        local = [x[:, mine].clone().requires_grad_() for x in (q, k, v)]
        cu = torch.tensor(bounds, dtype=torch.int32) if bounds is not None else None
        o = sp_softmax_attention(*local, sp_context=sp, cu_seqlens=cu)
        grads = torch.autograd.grad((o * w[:, mine]).sum(), local)
        errors[f"{name}/o"] = relative_error(o, o_ref[:, mine])
        for g_name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
            errors[f"{name}/{g_name}"] = relative_error(got, ref[:, mine])
    return errors


def _expected_shift_labels(labels, position_ids):
    """By hand: token t predicts labels[t + 1] unless t + 1 starts a new document (or t is last)."""
    T = labels.shape[1]
    out = torch.full_like(labels, -100)
    for t in range(T - 1):
        if position_ids[0, t + 1] != 0:
            out[0, t] = labels[0, t + 1]
    return out


def _sharding_cases(W, rank, sp):
    L = 8
    T = W * L
    mine = slice(rank * L, (rank + 1) * L)
    results = {}
    input_ids = torch.arange(100, 100 + T).view(1, T)
    labels = input_ids.clone()
    labels[0, 2] = -100
    doc_lengths = [5, L + 2] + [1] * (T - L - 7)  # the second crosses a cut, then length-1 documents
    assert sum(doc_lengths) == T
    position_ids = torch.cat([torch.arange(n) for n in doc_lengths]).view(1, T)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "attention_mask": torch.ones(1, T, dtype=torch.long), "extra": "kept"}
    out = shard_batch_for_sp(batch, sp)
    expected_cu = [0] + torch.tensor(doc_lengths).cumsum(0).tolist()
    results["input_ids"] = torch.equal(out["input_ids"], input_ids[:, mine])
    results["position_ids"] = torch.equal(out["position_ids"], position_ids[:, mine])
    results["shift_labels"] = torch.equal(out["shift_labels"], _expected_shift_labels(labels, position_ids)[:, mine])
    results["cu_seq_lens"] = out["cu_seq_lens_q"].tolist() == expected_cu and out["cu_seq_lens_q"].dtype == torch.int32
    results["cu_seq_lens_k"] = torch.equal(out["cu_seq_lens_k"], out["cu_seq_lens_q"])
    results["max_length"] = out["max_length_q"] == max(doc_lengths)
    results["labels_dropped"] = "labels" not in out
    results["passthrough"] = out["extra"] == "kept" and out["sp_context"] is sp
    results["mask_cut"] = out["attention_mask"].shape == (1, L)

    # Unpacked rows (B = 2): positions are the global ones, no cu_seq_lens.
    ids = torch.arange(2 * T).view(2, T)
    out = shard_batch_for_sp({"input_ids": ids, "labels": ids}, sp)
    full_shift = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    results["dense_shift_labels"] = torch.equal(out["shift_labels"], full_shift[:, mine])
    results["dense_position_ids"] = torch.equal(out["position_ids"], torch.arange(T)[mine].expand(2, L))
    results["dense_no_cu"] = "cu_seq_lens_q" not in out

    def message(fn):
        try:
            fn()
        except ValueError as err:
            return str(err)
        return ""

    bad_len = message(lambda: shard_batch_for_sp({"input_ids": torch.zeros(1, T + 1, dtype=torch.long)}, sp))
    results["error_length"] = f"T = {T + 1}" in bad_len and str(T + W) in bad_len and (W == 2 or str(T) in bad_len)
    padded = message(lambda: shard_batch_for_sp(
        {"input_ids": torch.zeros(1, T, dtype=torch.long), "attention_mask": torch.zeros(1, T)}, sp))
    results["error_padding"] = "padded" in padded
    packed_rows = message(lambda: shard_batch_for_sp(
        {"input_ids": torch.zeros(2, T, dtype=torch.long), "position_ids": position_ids.expand(2, T)}, sp))
    results["error_packed_rows"] = "batch size 1" in packed_rows
    return results


def _worker(W):
    rank = dist.get_rank()
    sp = SequenceParallelContext.from_group(dist.group.WORLD)
    return _attention_cases(W, rank, sp), _sharding_cases(W, rank, sp)


@functools.cache
def _run(W):
    return run_distributed(_worker, W, W)


@pytest.mark.distributed
@pytest.mark.parametrize("W", [2, 3])
def test_sp_softmax_attention_matches_unsharded(W):
    bad = [f"rank {r} {k}: {e:.2e}" for r, (errs, _) in enumerate(_run(W)) for k, e in errs.items() if not e <= TOL]
    assert not bad, "\n".join(bad)
    assert len(_run(W)[0][0]) == 8


@pytest.mark.distributed
@pytest.mark.parametrize("W", [2, 3])
def test_shard_batch_for_sp(W):
    bad = [f"rank {r} {k}" for r, (_, checks) in enumerate(_run(W)) for k, ok in checks.items() if not ok]
    assert not bad, bad
