"""The tiny LaspForCausalLM under sequence parallelism (W = 2, 3 gloo processes) against the same model
without SP: per-token logits, the summed loss (summed over ranks by hand) and every parameter gradient
(summed over ranks by hand, as DDP over the SP group would), for every token mixer and hybrids,
unpacked rows and packed documents that cross the cuts, ring and allgather."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.distributed as dist
from distributed_utils import relative_error, run_distributed
from lasp_hf.parallel import init_sequence_parallel
from lasp_hf.parallel.sharding import shard_batch_for_sp
from test_modeling_common import CASE_IDS, CASES, VOCAB, tiny_model

TOL = 1e-4
L = 10  # tokens per rank


def _batches(W):
    T = W * L
    gen = torch.Generator().manual_seed(W)
    dense_ids = torch.randint(1, VOCAB, (2, T), generator=gen)
    doc_lengths = [3, L + 4, 1, T - L - 8]  # the second document crosses a cut, the third has one token
    position_ids = torch.cat([torch.arange(n) for n in doc_lengths]).view(1, T)
    packed_ids = torch.randint(1, VOCAB, (1, T), generator=gen)
    # As DataCollatorWithFlattening: -100 at each document's first label, so no token predicts across documents.
    packed_labels = packed_ids.masked_fill(position_ids == 0, -100)
    return {
        "dense": {"input_ids": dense_ids, "labels": dense_ids.clone()},
        "packed": {"input_ids": packed_ids, "labels": packed_labels, "position_ids": position_ids},
    }


def _worker(W):
    rank = dist.get_rank()
    errors = {}
    contexts = {mode: init_sequence_parallel(W, mode=mode) for mode in ("ring", "allgather")}
    for (mixer, layer_types), case_id in zip(CASES, CASE_IDS):
        model = tiny_model(mixer, layer_types).float()
        params = [p for p in model.parameters() if p.requires_grad]
        for batch_name, batch in _batches(W).items():
            T = batch["input_ids"].shape[1]
            ref = model(**batch, loss_reduction="sum", logits_to_keep=T)
            ref_grads = torch.autograd.grad(ref.loss, params, allow_unused=True)
            for mode, ctx in contexts.items():
                local = shard_batch_for_sp(batch, ctx)
                out = model(**local, loss_reduction="sum", logits_to_keep=L)
                grads = torch.autograd.grad(out.loss, params, allow_unused=True)
                loss = out.loss.detach().clone()
                dist.all_reduce(loss)
                summed = []
                for p, g in zip(params, grads):
                    g = g.clone() if g is not None else torch.zeros_like(p)
                    dist.all_reduce(g)
                    summed.append(g)
                key = f"{case_id}/{batch_name}/{mode}"
                errors[f"{key}/logits"] = relative_error(out.logits, ref.logits[:, rank * L:(rank + 1) * L])
                errors[f"{key}/loss"] = relative_error(loss, ref.loss)
                ref_flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                      for p, g in zip(params, ref_grads)])
                errors[f"{key}/grads"] = relative_error(torch.cat([g.reshape(-1) for g in summed]), ref_flat)
                worst = max(relative_error(g, r) for g, r in zip(summed, ref_grads) if r is not None and r.norm() > 0)
                errors[f"{key}/worst_param_grad"] = worst
    errors.update(_checkpointing_cases(W, rank, contexts["ring"]))
    return errors


def _checkpointing_cases(W, rank, ctx):
    """Activation checkpointing re-runs the SP forward (and its exchange) inside backward."""
    errors = {}
    batch = _batches(W)["packed"]
    model = tiny_model("gated", ["linear_attention", "full_attention"]).float()
    params = list(model.parameters())
    ref = model(**batch, loss_reduction="sum")
    ref_grads = torch.autograd.grad(ref.loss, params, allow_unused=True)
    ref_flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(params, ref_grads)])
    # Under saved-tensor hooks (non-reentrant checkpointing, save_on_cpu) the SP op saves its inputs through the
    # hooks and records its local pass again in backward; without them it records the pass in forward.
    for reentrant, offload in ((True, False), (False, False), (False, True), (None, True)):
        model.train()
        if reentrant is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.zero_grad()
        with torch.autograd.graph.save_on_cpu() if offload else contextlib.nullcontext():
            out = model(**shard_batch_for_sp(batch, ctx), loss_reduction="sum")
        out.loss.backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        errors[f"checkpointing/reentrant={reentrant}/save_on_cpu={offload}/grads"] = relative_error(flat, ref_flat)
        model.gradient_checkpointing_disable()
    return errors


@functools.cache
def _run(W):
    return run_distributed(_worker, W, W)


@pytest.mark.distributed
@pytest.mark.parametrize("W", [2, 3])
def test_model_under_sp_matches_unsharded(W):
    results = _run(W)
    bad = [f"rank {r} {k}: {e:.2e}" for r, errs in enumerate(results) for k, e in errs.items() if not e <= TOL]
    assert not bad, "\n".join(bad)
    assert len(results[0]) == len(CASES) * 2 * 2 * 4 + 4
