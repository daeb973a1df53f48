"""Chunked prefill (`config.prompt_chunk_size`): a prompt with a cache run in chunks against the same prompt
in one call (float32, relative error <= 1e-5: the chunks reorder float32 sums, nothing else), for every token
mixer and hybrids, a prompt length that is not a multiple of the chunk, left padding, and generate()."""

import pytest
import torch
from lasp_hf.modeling.cache_lasp import LaspCache
from test_modeling_common import CASE_IDS, CASES, VOCAB, rel_err, tiny_model

TOL = 1e-5
T, CHUNK = 23, 5  # 5 chunks, the last one of 3 tokens
# Linear layers with a position encoding (global positions must run on from chunk to chunk).
POSITION_CASES = [
    ("lightning", None, {"position_encoding": "rope"}),
    ("gated", None, {"position_encoding": "lrpe"}),
]


def _cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


def _assert_same_cache(chunked: LaspCache, whole: LaspCache):
    assert chunked.get_seq_length() == whole.get_seq_length()
    for i, layer_type in enumerate(whole.layer_types):
        if layer_type == "linear_attention":
            assert rel_err(chunked.get_state(i), whole.get_state(i)) < TOL, f"state of layer {i}"
        else:
            assert chunked.layers[i].keys.shape == whole.layers[i].keys.shape
            assert rel_err(chunked.layers[i].keys, whole.layers[i].keys) < TOL, f"keys of layer {i}"
            assert rel_err(chunked.layers[i].values, whole.layers[i].values) < TOL, f"values of layer {i}"


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_chunked_prefill_equals_one_call(mixer, layer_types, monkeypatch):
    whole_model = tiny_model(mixer, layer_types, prompt_chunk_size=None)
    chunked_model = tiny_model(mixer, layer_types, prompt_chunk_size=CHUNK)
    x = torch.randint(1, VOCAB, (2, T))
    whole = whole_model(x, use_cache=True, logits_to_keep=1)

    seen = []
    layer = chunked_model.model.layers[0]
    original = layer.forward
    monkeypatch.setattr(layer, "forward", lambda h, *a, **k: seen.append(h.shape[1]) or original(h, *a, **k))
    chunked = chunked_model(x, use_cache=True, logits_to_keep=1)
    assert seen == [5, 5, 5, 5, 3], "every layer call must see at most one chunk"
    assert chunked.logits.shape == (2, 1, VOCAB)
    assert rel_err(chunked.logits, whole.logits) < TOL
    _assert_same_cache(_cache_of(chunked), _cache_of(whole))

    # Decoding on from the chunked cache gives the one-call cache's next logits.
    nxt = torch.randint(1, VOCAB, (2, 1))
    a = chunked_model(nxt, past_key_values=_cache_of(chunked), use_cache=True).logits
    b = whole_model(nxt, past_key_values=_cache_of(whole), use_cache=True).logits
    assert rel_err(a, b) < TOL


@pytest.mark.parametrize("mixer, layer_types", [CASES[0], CASES[-1]], ids=[CASE_IDS[0], CASE_IDS[-1]])
def test_chunked_prefill_after_a_cache_all_logits_and_hidden_states(mixer, layer_types):
    """A long continuation of a cache, all logits asked for (logits_to_keep=0: the chunks' outputs are
    concatenated) and every layer's hidden states."""
    whole_model = tiny_model(mixer, layer_types, prompt_chunk_size=None)
    chunked_model = tiny_model(mixer, layer_types, prompt_chunk_size=CHUNK)
    x = torch.randint(1, VOCAB, (1, 4 + T))
    caches = [_cache_of(m(x[:, :4], use_cache=True)) for m in (whole_model, chunked_model)]
    whole = whole_model(x[:, 4:], past_key_values=caches[0], use_cache=True, output_hidden_states=True)
    chunked = chunked_model(x[:, 4:], past_key_values=caches[1], use_cache=True, output_hidden_states=True)
    assert chunked.logits.shape == whole.logits.shape == (1, T, VOCAB)
    assert rel_err(chunked.logits, whole.logits) < TOL
    assert len(chunked.hidden_states) == len(whole.hidden_states)
    for a, b in zip(chunked.hidden_states, whole.hidden_states, strict=True):
        assert rel_err(a, b) < TOL
    _assert_same_cache(caches[1], caches[0])
    # The base model returns all positions too, a tuple without return_dict; inputs_embeds chunk as ids do.
    base = chunked_model.model(x[:, :T], use_cache=True, return_dict=False)
    ref = whole_model.model(x[:, :T], use_cache=True).last_hidden_state
    assert rel_err(base[0], ref) < TOL
    embeds = chunked_model.get_input_embeddings()(x[:, :T])
    from_embeds = chunked_model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits
    assert rel_err(from_embeds, whole_model(x[:, :T], use_cache=True, logits_to_keep=1).logits) < TOL


@pytest.mark.parametrize("mixer, layer_types", [CASES[2], CASES[-1]], ids=[CASE_IDS[2], CASE_IDS[-1]])
def test_chunked_prefill_left_padded_and_generate(mixer, layer_types):
    whole_model = tiny_model(mixer, layer_types, prompt_chunk_size=None)
    chunked_model = tiny_model(mixer, layer_types, prompt_chunk_size=CHUNK)
    ids = torch.randint(1, VOCAB, (2, T))
    ids[1, :7] = 0
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :7] = 0  # the padding spans a chunk and a half
    whole = whole_model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    chunked = chunked_model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    assert rel_err(chunked.logits, whole.logits) < TOL
    _assert_same_cache(_cache_of(chunked), _cache_of(whole))
    a = chunked_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    b = whole_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("mixer, layer_types, extra", POSITION_CASES, ids=["rope", "lrpe"])
def test_chunked_prefill_with_position_encodings(mixer, layer_types, extra):
    whole_model = tiny_model(mixer, layer_types, prompt_chunk_size=None, **extra)
    chunked_model = tiny_model(mixer, layer_types, prompt_chunk_size=CHUNK, **extra)
    x = torch.randint(1, VOCAB, (2, T))
    whole = whole_model(x, use_cache=True, logits_to_keep=1)
    chunked = chunked_model(x, use_cache=True, logits_to_keep=1)
    assert rel_err(chunked.logits, whole.logits) < TOL
    _assert_same_cache(_cache_of(chunked), _cache_of(whole))


def test_prompt_chunk_size_is_checked():
    with pytest.raises(ValueError, match="prompt_chunk_size"):
        tiny_model("lightning", prompt_chunk_size=0)


def test_generate_keeps_only_the_last_hidden_state_of_a_chunked_prompt():
    """generate() asks for the last logits only; the chunked prefill then never holds all T hidden states."""
    model = tiny_model("lightning", prompt_chunk_size=CHUNK)
    lengths = []
    model.model.register_forward_hook(
        lambda module, args, out: lengths.append(out.last_hidden_state.shape[1])
    )
    model.generate(torch.randint(1, VOCAB, (1, T)), max_new_tokens=2, do_sample=False)
    # The outer prefill call returns 1 position (its chunk calls 5, 5, 5, 5, 3), then one decoding step.
    assert lengths == [5, 5, 5, 5, 3, 1, 1]
