"""The lasp cache and generate(): cached == uncached, step-by-step decode == the full forward, O(1)
decode steps."""

import copy

import pytest
import torch
from lasp_hf.modeling import layers_lasp
from lasp_hf.modeling.cache_lasp import LaspCache
from test_modeling_common import CASE_IDS, CASES, VOCAB, rel_err, tiny_model
from transformers import DynamicCache


def _cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_cached_greedy_generate_equals_uncached(mixer, layer_types):
    model = tiny_model(mixer, layer_types)
    x = torch.randint(1, VOCAB, (2, 6))
    cached = model.generate(x, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(x, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_left_padded_generate_equals_unpadded(mixer, layer_types):
    model = tiny_model(mixer, layer_types)
    long, short = torch.randint(1, VOCAB, (8,)), torch.randint(1, VOCAB, (5,))
    ids = torch.stack([long, torch.cat([torch.zeros(3, dtype=torch.long), short])])
    mask = (torch.arange(8) >= torch.tensor([[0], [3]])).long()
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, prompt in ((0, long), (1, short)):
        alone = model.generate(prompt[None], max_new_tokens=8, do_sample=False)
        assert torch.equal(batch[row, 8:], alone[0, len(prompt) :])


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_step_by_step_decode_equals_full_forward(mixer, layer_types):
    model = tiny_model(mixer, layer_types)
    x = torch.randint(1, VOCAB, (2, 14))
    full = model(x, use_cache=False).logits
    out = model(x[:, :5], use_cache=True)
    cache = _cache_of(out)
    assert isinstance(cache, LaspCache) and cache.get_seq_length() == 5
    steps = [out.logits]
    for t in range(5, 10):
        out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    # A multi-token chunk after a cache (prefill continuation), then one more step, through the `cache` name.
    out = model(x[:, 10:13], cache=cache, use_cache=True)
    steps.append(out.logits)
    out = model(x[:, 13:14], past_key_values=cache, use_cache=True)
    steps.append(out.logits)
    assert cache.get_seq_length() == 14
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-4
    # cache_position (as older generate() passes it) gives the same positions.
    cache = _cache_of(model(x[:, :5], use_cache=True))
    rest = model(x[:, 5:], past_key_values=cache, cache_position=torch.arange(5, 14), use_cache=True).logits
    assert rel_err(rest, full[:, 5:]) < 1e-4


def test_left_padded_decode_with_cache_equals_unpadded():
    model = tiny_model("gated", ["linear_attention", "full_attention"])
    seq = torch.randint(1, VOCAB, (9,))
    full = model(seq[None], use_cache=False).logits[0]
    ids = torch.cat([torch.zeros(2, dtype=torch.long), seq])[None]
    mask = torch.cat([torch.zeros(2), torch.ones(9)]).long()[None]
    out = model(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
    logits = [out.logits[0, 2:]]
    for t in range(7, 11):
        out = model(
            ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=_cache_of(out), use_cache=True
        )
        logits.append(out.logits[0])
    assert rel_err(torch.cat(logits), full) < 1e-4


def test_right_padding_leaves_the_state_of_the_last_real_token():
    model = tiny_model("lightning")
    seq = torch.randint(1, VOCAB, (6,))
    ids = torch.cat([seq, torch.zeros(3, dtype=torch.long)])[None]
    mask = torch.cat([torch.ones(6), torch.zeros(3)]).long()[None]
    padded = _cache_of(model(ids, attention_mask=mask, use_cache=True))
    plain = _cache_of(model(seq[None], use_cache=True))
    for layer in range(2):
        assert rel_err(padded.get_state(layer), plain.get_state(layer)) < 1e-5


def test_decode_step_is_constant_in_context_length(monkeypatch):
    """A decode step uses the single-token recurrence on a fixed-size state, never the whole context."""
    model = tiny_model("lightning")
    states = {}
    for T in (4, 40):
        cache = _cache_of(model(torch.randint(1, VOCAB, (1, T)), use_cache=True))
        states[T] = [tuple(cache.get_state(i).shape) for i in range(2)]
        assert all(cache.get_state(i).dtype == torch.float32 for i in range(2))

        def no_chunked_pass(*args, **kwargs):
            raise AssertionError("a decode step must not run the chunked op over the context")

        with monkeypatch.context() as patch:
            patch.setattr(layers_lasp, "linear_attention", no_chunked_pass)
            model(torch.randint(1, VOCAB, (1, 1)), past_key_values=cache, use_cache=True)
    assert states[4] == states[40] == [(1, 4, 8, 8)] * 2


def test_cache_batch_operations():
    model = tiny_model("gated", ["linear_attention", "full_attention"])
    cache = _cache_of(model(torch.randint(1, VOCAB, (2, 5)), use_cache=True))
    state = cache.get_state(0).clone()
    assert cache.is_linear == [True, False] and cache.batch_size == 2
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.get_state(0), state.flip(0))
    cache.batch_repeat_interleave(2)
    assert cache.get_state(0).shape[0] == 4 and cache.layers[1].keys.shape[0] == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert cache.batch_size == 2
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.get_state(0) is None


def test_foreign_cache_and_packed_cache_are_rejected():
    model = tiny_model("lightning")
    x = torch.randint(1, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="LaspCache"):
        model(x, past_key_values=DynamicCache(), use_cache=True)
    with pytest.raises(ValueError, match="cache"):
        model(x, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), use_cache=True)


def test_beam_search_runs_and_matches_uncached():
    model = tiny_model("gated", ["linear_attention", "full_attention"])
    x = torch.randint(1, VOCAB, (2, 5))
    cached = model.generate(x, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=True)
    uncached = model.generate(x, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_crop_rolls_back_into_the_last_call(mixer, layer_types):
    """After a multi-token call, cropping k tokens leaves the cache as if the call had had T - k tokens: the
    next logits equal the full forward's (the reference: no cache at all)."""
    model = tiny_model(mixer, layer_types)
    x = torch.randint(1, VOCAB, (2, 14))
    full = model(x, use_cache=False).logits
    cache = _cache_of(model(x[:, :4], use_cache=True))
    model(x[:, 4:10], past_key_values=cache, use_cache=True)  # verification of 6 tokens, 3 of them rejected
    cache.crop(-3)
    assert cache.get_seq_length() == 7
    out = model(x[:, 7:9], past_key_values=cache, use_cache=True)  # the tokens after the accepted ones
    assert rel_err(out.logits, full[:, 7:9]) < 1e-4
    cache.crop(-1)  # again, inside the call just made
    out = model(x[:, 8:12], past_key_values=cache, use_cache=True)
    assert rel_err(out.logits, full[:, 8:12]) < 1e-4
    cache.crop(0)  # nothing
    assert cache.get_seq_length() == 12
    cache.crop(-9)  # back over three calls, into the prompt
    out = model(x[:, 3:12], past_key_values=cache, use_cache=True)
    assert rel_err(out.logits, full[:, 3:12]) < 1e-4
    cache.rollback_tokens = 0  # each call opens a window that alone reaches back far enough: the last call
    model(x[:, 12:13], past_key_values=cache, use_cache=True)  # the next token: cache length 13
    model(x[:, :2], past_key_values=cache, use_cache=True)  # and two more (any): 15
    with pytest.raises(ValueError, match="latest tokens"):
        cache.crop(-3)  # back past the start of the last call (13): folded into the state
    cache.crop(-2)  # to 13, the start of the last call
    out = model(x[:, 13:14], past_key_values=cache, use_cache=True)
    assert rel_err(out.logits, full[:, 13:14]) < 1e-4


def test_chunked_prefill_keeps_the_last_chunk_for_rollback():
    """A prompt prefilled in chunks longer than rollback_tokens keeps the k and v of its last chunk only (not the
    one before), and a crop inside that chunk still gives the full forward's logits."""
    model = tiny_model("gated", ["linear_attention", "full_attention"])
    x = torch.randint(1, VOCAB, (1, 40))
    full = model(x, use_cache=False).logits
    cache = _cache_of(model(x[:, :12], use_cache=True))
    cache.rollback_tokens = 8
    for start in (12, 24):
        model(x[:, start:start + 12], past_key_values=cache, use_cache=True)  # chunks of 12 > 8 tokens
    layer = cache.layers[0]
    assert layer.previous_replay is None and layer.replay.start == 24 and layer.replay.length == 12
    cache.crop(-5)
    out = model(x[:, 31:40], past_key_values=cache, use_cache=True)
    assert rel_err(out.logits, full[:, 31:40]) < 1e-4


def test_crop_over_many_decode_steps_as_a_draft_model_does():
    """A draft model decodes its candidates one token per call, then drops the rejected ones: the states roll back
    over several calls; past rollback_tokens the oldest calls are dropped (at most two windows of them are kept)."""
    model = tiny_model("lightning", ["linear_attention", "full_attention"])
    x = torch.randint(1, VOCAB, (1, 30))
    full = model(x, use_cache=False).logits
    cache = _cache_of(model(x[:, :4], use_cache=True))
    cache.rollback_tokens = 8
    for t in range(4, 28):
        model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
    windows = [cache.layers[0].replay, cache.layers[0].previous_replay]
    assert sum(w.length for w in windows if w is not None) < 2 * 8
    cache.crop(-6)
    out = model(x[:, 22:30], past_key_values=cache, use_cache=True)
    assert rel_err(out.logits, full[:, 22:30]) < 1e-4


def test_crop_after_the_prompt_and_after_a_decode_step():
    model = tiny_model("gated")
    x = torch.randint(1, VOCAB, (1, 9))
    full = model(x, use_cache=False).logits
    cache = _cache_of(model(x[:, :6], use_cache=True))
    cache.crop(-6)  # the whole prompt: an empty state
    assert cache.get_seq_length() == 0 and cache.get_state(0) is None
    cache = _cache_of(model(x[:, :6], use_cache=True))
    model(x[:, 6:7], past_key_values=cache, use_cache=True)
    cache.crop(-1)
    out = model(x[:, 6:9], past_key_values=cache, use_cache=True)
    assert rel_err(out.logits, full[:, 6:9]) < 1e-4


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_assisted_and_prompt_lookup_decoding_equal_greedy(mixer, layer_types):
    """transformers verifies draft tokens with one forward and crops the rejected ones from the cache: the
    output must be greedy decoding's, token for token."""
    model = tiny_model(mixer, layer_types)
    assistant = tiny_model(mixer, layer_types, seed=1)  # another model: some drafts are rejected
    # A prompt with repeats, so prompt lookup finds candidates.
    x = torch.randint(1, VOCAB, (1, 5)).repeat(1, 3)
    greedy = model.generate(x, max_new_tokens=20, do_sample=False)
    assisted = model.generate(x, max_new_tokens=20, do_sample=False, assistant_model=assistant)
    lookup = model.generate(x, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=3)
    self_assisted = model.generate(x, max_new_tokens=20, do_sample=False, assistant_model=model)
    assert torch.equal(assisted, greedy)
    assert torch.equal(lookup, greedy)
    assert torch.equal(self_assisted, greedy)


@pytest.mark.parametrize("mixer, layer_types", [CASES[0], CASES[4]], ids=[CASE_IDS[0], CASE_IDS[4]])
def test_output_attentions(mixer, layer_types):
    """Softmax layers return their weights (the softmax of the masked scores, recomputed here from the layer's
    own q and k); linear layers return None."""
    model = tiny_model(mixer, layer_types)
    model.config._attn_implementation = "sdpa"  # weights are computed eagerly even so
    x = torch.randint(1, VOCAB, (2, 7))
    out = model(x, output_attentions=True, use_cache=False)
    assert len(out.attentions) == 2
    for i, kind in enumerate(model.config.layer_types):
        if kind == "linear_attention":
            assert out.attentions[i] is None
            continue
        weights = out.attentions[i]
        assert weights.shape == (2, 4, 7, 7)
        captured = {}
        layer = model.model.layers[i]
        handle = layer.token_mixer.register_forward_pre_hook(
            lambda module, args, kwargs: captured.update(x=args[0], pe=kwargs["position_embeddings"]),
            with_kwargs=True,
        )
        model(x, use_cache=False)
        handle.remove()
        mixer_module = layer.token_mixer
        h = captured["x"].double()
        q = (h @ mixer_module.q_proj.weight.double().T).view(2, 7, 4, 8)
        k = (h @ mixer_module.k_proj.weight.double().T).view(2, 7, 4, 8)
        cos, sin = (t.double()[:, :, None] for t in captured["pe"])
        rot = lambda t: torch.cat((-t[..., 4:], t[..., :4]), dim=-1)  # noqa: E731
        q, k = (q * cos + rot(q) * sin).transpose(1, 2), (k * cos + rot(k) * sin).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / 8**0.5
        scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
        assert rel_err(weights, scores.softmax(-1)) < 1e-5
        # Unchanged outputs with the weights on.
        assert rel_err(out.logits, model(x, use_cache=False).logits) < 1e-5
    assert model(x, use_cache=False).attentions is None


EXPORT_CASES = [CASES[0], CASES[2], CASES[4]]  # fixed decay, per-token decay, and a hybrid with a softmax layer
EXPORT_IDS = [CASE_IDS[0], CASE_IDS[2], CASE_IDS[4]]


def _padded_batch():
    x = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding in row 1
    return x, mask


# Export is the slower of the two (~8 s a case on 2 cores): the per-token decay and the hybrid cover its paths.
@pytest.mark.parametrize("mixer, layer_types", EXPORT_CASES[1:], ids=EXPORT_IDS[1:])
@torch.no_grad()
def test_torch_export_forward_and_decode_step(mixer, layer_types):
    """torch.export of the forward with a padding mask (no cache, and returning one) and of a decode step that
    takes a LaspCache (a pytree node): the exported programs give the eager model's outputs."""
    model = tiny_model(mixer, layer_types)
    x, mask = _padded_batch()
    for use_cache in (False, True):
        kwargs = dict(input_ids=x, attention_mask=mask, use_cache=use_cache)
        program = torch.export.export(model, (), kwargs, strict=False)
        exported, eager = program.module()(**kwargs), model(**kwargs)
        assert rel_err(exported.logits, eager.logits) < 1e-6
    cache = _cache_of(eager)
    assert isinstance(_cache_of(exported), LaspCache)
    step = dict(
        input_ids=torch.randint(1, VOCAB, (2, 1)),
        attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1),
    )
    program = torch.export.export(
        model, (), dict(step, past_key_values=copy.deepcopy(cache), use_cache=True), strict=False
    )
    exported = program.module()(**step, past_key_values=copy.deepcopy(cache), use_cache=True)
    eager = model(**step, past_key_values=copy.deepcopy(cache), use_cache=True)
    assert rel_err(exported.logits, eager.logits) < 1e-6
    assert _cache_of(exported).get_seq_length() == 7
    for layer in range(2):
        if model.config.layer_types[layer] == "linear_attention":
            assert rel_err(_cache_of(exported).get_state(layer), _cache_of(eager).get_state(layer)) < 1e-6


@pytest.mark.parametrize("mixer, layer_types", EXPORT_CASES, ids=EXPORT_IDS)
@torch.no_grad()
def test_compile_fullgraph_forward_and_decode_step(mixer, layer_types):
    """torch.compile(fullgraph=True) traces the masked forward and the decode step without a graph break
    (dynamo raises on one); the "eager" backend keeps the test fast, what is checked is the trace."""
    torch._dynamo.reset()  # no sizes seen by earlier compilations of the forward (they would make them dynamic)
    model = tiny_model(mixer, layer_types)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, mask = _padded_batch()
    out = compiled(input_ids=x, attention_mask=mask, use_cache=True)
    assert rel_err(out.logits, model(x, attention_mask=mask, use_cache=False).logits) < 1e-6
    next_ids = torch.randint(1, VOCAB, (2, 1))
    full_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    eager_cache = copy.deepcopy(_cache_of(out))
    step = compiled(input_ids=next_ids, attention_mask=full_mask, past_key_values=_cache_of(out), use_cache=True)
    eager = model(next_ids, attention_mask=full_mask, past_key_values=eager_cache, use_cache=True)
    assert rel_err(step.logits, eager.logits) < 1e-6
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mixer, layer_types", EXPORT_CASES, ids=EXPORT_IDS)
@torch.no_grad()
def test_assisted_decoding_equals_greedy_on_the_triton_path(mixer, layer_types):
    """On CUDA the states come from the Triton kernels (head dim 16: the kernels' smallest tile), and a crop
    recomputes a state with them: assisted and prompt-lookup decoding still give greedy decoding's tokens."""
    model = tiny_model(mixer, layer_types, hidden_size=64, intermediate_size=128).cuda()
    assistant = tiny_model(mixer, layer_types, seed=1, hidden_size=64, intermediate_size=128).cuda()
    x = torch.randint(1, VOCAB, (1, 8), device="cuda").repeat(1, 3)
    greedy = model.generate(x, max_new_tokens=24, do_sample=False)
    assert torch.equal(model.generate(x, max_new_tokens=24, do_sample=False, assistant_model=assistant), greedy)
    assert torch.equal(model.generate(x, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=3), greedy)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_compile_with_graph_breaks_on_the_triton_path():
    """On CUDA the Triton kernels are launched from Python after host-side planning, which dynamo does not trace:
    torch.compile without fullgraph (graph breaks around the kernels) must still give the eager outputs, for the
    masked prefill and a decode step. (fullgraph=True and torch.export hold on the PyTorch path only.)"""
    model = tiny_model("gated", ["linear_attention", "full_attention"], hidden_size=64, intermediate_size=128).cuda()
    compiled = torch.compile(model)
    x, mask = (t.cuda() for t in _padded_batch())
    out = compiled(input_ids=x, attention_mask=mask, use_cache=True)
    eager = model(x, attention_mask=mask, use_cache=True)
    assert rel_err(out.logits, eager.logits) < 1e-4  # float32; inductor may fuse the token-wise parts
    next_ids = torch.randint(1, VOCAB, (2, 1), device="cuda")
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    step = compiled(input_ids=next_ids, attention_mask=full_mask, past_key_values=_cache_of(out), use_cache=True)
    eager = model(next_ids, attention_mask=full_mask, past_key_values=_cache_of(eager), use_cache=True)
    assert rel_err(step.logits, eager.logits) < 1e-4
    torch._dynamo.reset()
