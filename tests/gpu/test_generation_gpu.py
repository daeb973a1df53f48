"""Inference on a GPU: CUDA-graph greedy decoding (`generate(..., cache_implementation="static")`) against
eager `generate`, and chunked prefill against one call, on the Triton kernels.

Greedy tokens must be identical: a linear-attention model's graph replays the very kernels of eager decoding
(bf16). A hybrid's graph attends over a fixed-length key buffer with a mask while eager attends over the exact
keys, so SDPA may pick another kernel; it runs in float32, where the two agree to ~1e-6 and the argmax with
them. Chunked prefill in bf16: relative error <= 1e-2 (the bf16 rule of tests/gpu/test_triton_gpu.py) on the last logits and every
state.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lasp_hf import LaspConfig, LaspForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB = 1000
HYBRID = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def _model(layer_types=None, dtype=torch.bfloat16, **overrides):
    torch.manual_seed(0)
    config = LaspConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=128,
        intermediate_size=1024,
        layer_types=layer_types,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        initializer_range=0.1,
        **overrides,
    )
    return LaspForCausalLM(config).to("cuda", dtype).eval()


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all()
    return ((x - ref).norm() / ref.norm()).item()


def _cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


@pytest.mark.parametrize("B", [1, 64])
def test_graph_decoding_equals_eager_greedy(B):
    model = _model()
    ids = torch.randint(1, VOCAB, (B, 300), device="cuda")
    eager = model.generate(ids, max_new_tokens=48, do_sample=False)
    fast = model.generate(ids, max_new_tokens=48, cache_implementation="static")
    assert model._lasp_graph_decoder.graph is not None, "the step must have been captured as a CUDA graph"
    assert torch.equal(fast, eager)
    # Replaying the same graph for another prompt.
    other = torch.randint(1, VOCAB, (B, 200), device="cuda")
    graph = model._lasp_graph_decoder.graph
    again = model.generate(other, max_new_tokens=20, cache_implementation="static")
    assert model._lasp_graph_decoder.graph is graph
    assert torch.equal(again, model.generate(other, max_new_tokens=20, do_sample=False))


@pytest.mark.parametrize("B", [1, 8])
def test_graph_decoding_of_a_hybrid_equals_eager_greedy(B):
    model = _model(HYBRID, dtype=torch.float32)
    ids = torch.randint(1, VOCAB, (B, 300), device="cuda")
    mask = torch.ones_like(ids)
    if B > 1:
        mask[1, :37] = 0  # left padding in one row
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=40, cache_implementation="static")
    assert torch.equal(fast, eager)


def test_fused_projections_equal_separate_ones_bf16():
    """`fuse_projections` (one cuBLAS product per group) against a copy never fused (one per projection): prefill
    logits (200 rows: fused, at most parts_lasp.MAX_FUSED_ROWS), a decoding step and the states agree to the bf16
    rule; the graph step captures the fused products."""
    from lasp_hf.modeling import parts_lasp

    model, plain = _model(), _model()
    plain.load_state_dict(model.state_dict())
    model.fuse_projections()
    ids = torch.randint(1, VOCAB, (2, 100), device="cuda")
    assert ids.numel() <= parts_lasp.MAX_FUSED_ROWS
    with torch.no_grad():
        out, ref = model(ids, use_cache=True), plain(ids, use_cache=True)
        assert _rel(out.logits, ref.logits) <= 1e-2
        step = torch.randint(1, VOCAB, (2, 1), device="cuda")
        out = model(step, past_key_values=_cache_of(out), use_cache=True)
        ref = plain(step, past_key_values=_cache_of(ref), use_cache=True)
    assert _rel(out.logits, ref.logits) <= 1e-2
    for i in range(model.config.num_hidden_layers):
        assert _rel(_cache_of(out).get_state(i), _cache_of(ref).get_state(i)) <= 1e-2
    with torch.no_grad():
        assert model.model.layers[0].token_mixer.qkvu.weight() is not None
    fast = model.generate(ids[:1], max_new_tokens=16, cache_implementation="static")
    assert torch.equal(fast, model.generate(ids[:1], max_new_tokens=16, do_sample=False))


@pytest.mark.parametrize("layer_types", [None, HYBRID], ids=["lightning", "hybrid"])
def test_chunked_prefill_equals_one_call_bf16(layer_types):
    whole_model = _model(layer_types, prompt_chunk_size=None)
    chunked_model = _model(layer_types, prompt_chunk_size=1024)
    ids = torch.randint(1, VOCAB, (2, 3000), device="cuda")
    with torch.no_grad():
        whole = whole_model(ids, use_cache=True, logits_to_keep=1)
        chunked = chunked_model(ids, use_cache=True, logits_to_keep=1)
    assert _rel(chunked.logits, whole.logits) <= 1e-2
    a, b = _cache_of(chunked), _cache_of(whole)
    for i, layer_type in enumerate(whole_model.config.layer_types):
        if layer_type == "linear_attention":
            assert _rel(a.get_state(i), b.get_state(i)) <= 1e-2, f"state of layer {i}"
        else:
            assert _rel(a.layers[i].keys, b.layers[i].keys) <= 1e-2, f"keys of layer {i}"


def test_chunked_prefill_memory_is_bounded_by_the_chunk():
    """Peak memory of a 64K-token prefill in 4K chunks stays near that of one 4K call (not 16x it)."""
    model = _model(prompt_chunk_size=4096)
    ids = torch.randint(1, VOCAB, (1, 65536), device="cuda")
    peaks = {}
    for T in (4096, 65536):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            model(ids[:, :T], use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        peaks[T] = torch.cuda.max_memory_allocated() - base
    assert peaks[65536] < 1.5 * peaks[4096], peaks
