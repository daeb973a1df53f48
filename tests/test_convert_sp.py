"""Converted published models under sequence parallelism (gloo, W = 2) against the same model without SP: logits
of each rank's slice, the summed loss and every parameter gradient (summed over ranks by hand, as DDP over the SP
group would). LRPE (TransNormerLLM) and RoPE (fla RetNet) must see each token's global position: the slice's
position_ids from `shard_batch_for_sp`, the rank's offset when no position_ids are passed, and positions that
restart in packed documents crossing the cut. fla GLA's per-key-channel decay crosses the cut through the op's
per-channel SP path. Also: activation chunks (`attention_chunk_size`) with a position
encoding give the unchunked gradients."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from convert_sources import VOCAB, gla_source, retnet_source, tnl_source
from distributed_utils import relative_error, run_distributed
from lasp_hf import LaspForCausalLM
from lasp_hf.convert import convert
from lasp_hf.parallel import init_sequence_parallel
from lasp_hf.parallel.sharding import shard_batch_for_sp

TOL = 1e-4
L = 8  # tokens per rank


def _batches(W):
    T = W * L
    gen = torch.Generator().manual_seed(W)
    dense = torch.randint(3, VOCAB, (2, T), generator=gen)
    doc_lengths = [3, L + 2, T - L - 5]  # the second document crosses the cut
    position_ids = torch.cat([torch.arange(n) for n in doc_lengths]).view(1, T)
    packed = torch.randint(3, VOCAB, (1, T), generator=gen)
    return {
        "dense": {"input_ids": dense, "labels": dense.clone()},
        "packed": {"input_ids": packed, "labels": packed.masked_fill(position_ids == 0, -100),
                   "position_ids": position_ids},
    }


def _grads(loss, params):
    return [g if g is not None else torch.zeros_like(p) for p, g in
            zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True)]


def _worker(W, folders):
    rank = dist.get_rank()
    errors = {}
    contexts = {mode: init_sequence_parallel(W, mode=mode) for mode in ("ring", "allgather")}
    for name, folder in folders.items():
        model = LaspForCausalLM.from_pretrained(folder, dtype=torch.float32)
        params = [p for p in model.parameters() if p.requires_grad]
        for batch_name, batch in _batches(W).items():
            T = batch["input_ids"].shape[1]
            ref = model(**batch, loss_reduction="sum", logits_to_keep=T)
            ref_grads = _grads(ref.loss, params)
            for mode, ctx in contexts.items():
                local = shard_batch_for_sp(batch, ctx)
                variants = {"sharded": local}
                if batch_name == "dense":  # the model's own default: the rank's offset
                    variants["no_position_ids"] = {k: v for k, v in local.items() if k != "position_ids"}
                for variant, inputs in variants.items():
                    out = model(**inputs, loss_reduction="sum", logits_to_keep=L)
                    grads = _grads(out.loss, params)
                    loss = out.loss.detach().clone()
                    dist.all_reduce(loss)
                    for g in grads:
                        dist.all_reduce(g)
                    key = f"{name}/{batch_name}/{mode}/{variant}"
                    errors[f"{key}/logits"] = relative_error(out.logits, ref.logits[:, rank * L:(rank + 1) * L])
                    errors[f"{key}/loss"] = relative_error(loss, ref.loss)
                    errors[f"{key}/grads"] = relative_error(torch.cat([g.reshape(-1) for g in grads]),
                                                            torch.cat([g.reshape(-1) for g in ref_grads]))
    return errors


@functools.cache
def _folders():
    root = Path(tempfile.mkdtemp(prefix="lasp-convert-sp-"))
    tnl_source(root / "tnl", heads=5, lrpe_list=(1, 0, 1))
    retnet_source(root / "retnet", heads=2)
    gla_source(root / "gla", heads=2)
    return {
        "transnormer": str(convert("transnormer", root / "tnl", root / "tnl-lasp")),
        "fla-retnet": str(convert("fla-retnet", root / "retnet", root / "retnet-lasp")),
        "fla-gla": str(convert("fla-gla", root / "gla", root / "gla-lasp")),
    }


@pytest.mark.distributed
def test_converted_models_under_sp_match_unsharded():
    results = run_distributed(_worker, 2, 2, _folders())
    bad = [f"rank {r} {k}: {e:.2e}" for r, errs in enumerate(results) for k, e in errs.items() if not e <= TOL]
    assert not bad, "\n".join(bad)
    assert len(results[0]) == len(_folders()) * (2 * 2 + 2) * 3


@pytest.mark.parametrize("name", ["transnormer", "fla-retnet", "fla-gla"])
def test_attention_chunks_with_position_encoding_give_same_gradients(name):
    model = LaspForCausalLM.from_pretrained(_folders()[name], dtype=torch.float32).train()
    batch = _batches(2)["packed"]
    params = list(model.parameters())
    ref = model(**batch)
    ref_grads = _grads(ref.loss, params)
    model.config.attention_chunk_size = 5
    out = model(**batch)
    grads = _grads(out.loss, params)
    assert relative_error(out.loss, ref.loss) <= TOL
    assert relative_error(torch.cat([g.reshape(-1) for g in grads]), torch.cat([g.reshape(-1) for g in ref_grads])) <= TOL
