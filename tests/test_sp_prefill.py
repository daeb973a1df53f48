"""Sequence-parallel prefill (`lasp_hf.parallel.sp_prefill`, W = 2, 3 gloo processes) against the one-process
prefill of the same prompt: the last position's logits, every linear layer's state, every full-attention
layer's keys / values, and the logits of a decoding step from the cache, on every rank, for ring and
all-gather, prompt lengths with and without a remainder (T mod W). float32, relative error <= 1e-5: LASP only
regroups the float32 sums of the recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_utils import relative_error, run_distributed
from lasp_hf.parallel import init_sequence_parallel, sp_prefill
from test_modeling_common import CASE_IDS, CASES, VOCAB, tiny_model

TOL = 1e-5


def _cache_tensors(cache, layer_types):
    out = []
    for i, layer_type in enumerate(layer_types):
        if layer_type == "linear_attention":
            out.append(cache.get_state(i))
        else:
            out += [cache.layers[i].keys, cache.layers[i].values]
    return out


def _errors(model, ids, logits, cache, nxt):
    """Relative errors of an SP prefill's results against the one-process prefill (and one decoding step)."""
    ref = model(ids, use_cache=True, logits_to_keep=1)
    ref_cache = ref.cache if "cache" in ref else ref.past_key_values
    errors = [relative_error(logits, ref.logits[:, -1])]
    layer_types = model.config.layer_types
    assert cache.get_seq_length() == ids.shape[1]
    for mine, theirs in zip(
        _cache_tensors(cache, layer_types), _cache_tensors(ref_cache, layer_types), strict=True
    ):
        assert mine.shape == theirs.shape
        errors.append(relative_error(mine, theirs))
    step = model(nxt, past_key_values=cache, use_cache=True).logits
    errors.append(relative_error(step, model(nxt, past_key_values=ref_cache, use_cache=True).logits))
    return max(errors)


def _worker(W, lengths, case_indices):
    results = {}
    contexts = {mode: init_sequence_parallel(W, mode=mode) for mode in ("ring", "allgather")}
    for index in case_indices:
        mixer, layer_types = CASES[index]
        # Linear layers with a position encoding too (each slice must use its global positions).
        extra = {"position_encoding": "rope"} if index == 0 else {}
        model = tiny_model(mixer, layer_types, prompt_chunk_size=None, **extra)
        for T in lengths:
            gen = torch.Generator().manual_seed(T)
            ids = torch.randint(1, VOCAB, (2, T), generator=gen)
            nxt = torch.randint(1, VOCAB, (2, 1), generator=gen)
            for mode, ctx in contexts.items():
                logits, cache = sp_prefill(model, ids, ctx)
                results[f"{CASE_IDS[index]}/T{T}/{mode}"] = _errors(model, ids, logits, cache, nxt)
    return results


@pytest.mark.parametrize(
    "W, lengths, cases", [(2, (12, 13), range(len(CASES))), (3, (12, 14), (0, 4))], ids=["W2", "W3"]
)
def test_sp_prefill_equals_one_process_prefill(W, lengths, cases):
    per_rank = run_distributed(_worker, W, W, lengths, tuple(cases))
    for rank, results in enumerate(per_rank):
        assert len(results) == len(cases) * len(lengths) * 2
        for key, err in results.items():
            assert err < TOL, f"rank {rank} {key}: relative error {err:.2e}"


def _mismatch_worker():
    ctx = init_sequence_parallel(2)
    model = tiny_model("lightning")
    T = 8 if dist.get_rank() == 0 else 10
    try:
        sp_prefill(model, torch.randint(1, VOCAB, (1, T)), ctx)
    except ValueError as err:
        return str(err)
    return None


def test_sp_prefill_rejects_ranks_with_different_prompts():
    messages = run_distributed(_mismatch_worker, 2)
    assert all(m is not None and "same prompt shape" in m for m in messages)


def _gpu_worker(W):
    """On cuda:rank with NCCL, a bf16 hybrid on the Triton kernels: SP prefill against the one-process prefill
    on the same card (both bf16: relative error <= 1e-2, the project's bf16 rule)."""
    from lasp_hf import LaspConfig, LaspForCausalLM

    torch.manual_seed(0)
    config = LaspConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        prompt_chunk_size=None,
        initializer_range=0.1,
    )
    model = LaspForCausalLM(config).to("cuda", torch.bfloat16).eval()
    results = {}
    for mode in ("ring", "allgather"):
        ctx = init_sequence_parallel(W, mode=mode)
        for T in (W * 2048, W * 2048 + 1):
            gen = torch.Generator().manual_seed(T)
            ids = torch.randint(1, 1000, (2, T), generator=gen).cuda()
            nxt = torch.randint(1, 1000, (2, 1), generator=gen).cuda()
            with torch.no_grad():
                logits, cache = sp_prefill(model, ids, ctx)
                results[f"T{T}/{mode}"] = _errors(model, ids, logits, cache, nxt)
    return results


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.parametrize("W", [2, 4])
def test_sp_prefill_nccl_bf16(W):
    if not torch.cuda.is_available() or torch.cuda.device_count() < W:
        pytest.skip(f"needs {W} CUDA GPUs")
    per_rank = run_distributed(_gpu_worker, W, W, backend="nccl", timeout_s=600)
    for rank, results in enumerate(per_rank):
        assert len(results) == 4
        for key, err in results.items():
            assert err <= 1e-2, f"rank {rank} {key}: relative error {err:.2e}"
