"""Fixed-shape decoding (`generate(..., cache_implementation="static")`, modeling/generation_lasp.py) against
the eager cached path: the static-buffer step's logits (float32, relative error <= 1e-5: the same math on the
same values, only the full-attention layers' softmax runs over zero-masked extra slots), and greedy tokens
identical to eager `generate`, with left padding, end tokens, chunked prompts and hybrids. On CPU the step
runs eagerly; the CUDA graph of the same step is tested in tests/gpu/test_generation_gpu.py."""

import copy
import pickle
import shutil

import pytest
import torch
from lasp_hf.modeling.generation_lasp import LaspGraphDecoder, LaspStaticCache
from test_modeling_common import CASE_IDS, CASES, VOCAB, rel_err, tiny_model

TOL = 1e-5


def _cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


def _left_padded(B=3, P=9, pads=(0, 4, 1), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, P), generator=gen)
    mask = (torch.arange(P)[None] >= torch.tensor(pads)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_static_cache_step_logits_equal_eager(mixer, layer_types):
    model = tiny_model(mixer, layer_types)
    ids, mask = _left_padded()
    steps = torch.randint(1, VOCAB, (3, 5))
    eager_cache = _cache_of(model(ids, attention_mask=mask, use_cache=True))
    prefilled = _cache_of(model(ids, attention_mask=mask, use_cache=True))
    static = LaspStaticCache(model.config, prefilled, 32)
    static.load(prefilled, mask)
    positions = mask.sum(dim=1, keepdim=True)
    step_mask = mask
    for t in range(steps.shape[1]):
        step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        eager = model(
            steps[:, t : t + 1], attention_mask=step_mask, past_key_values=eager_cache, use_cache=True
        )
        if static.key_mask is not None:
            static.key_mask.index_fill_(-1, static.cursor, True)
        fixed = model(steps[:, t : t + 1], position_ids=positions + t, past_key_values=static, use_cache=True)
        static.cursor.add_(1)
        assert rel_err(fixed.logits, eager.logits) < TOL, f"step {t}"
    for i, layer_type in enumerate(model.config.layer_types):
        if layer_type == "linear_attention":
            assert rel_err(static.get_state(i), eager_cache.get_state(i)) < TOL


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_static_generate_equals_eager_generate(mixer, layer_types):
    model = tiny_model(mixer, layer_types)
    ids, mask = _left_padded()
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=12, cache_implementation="static")
    assert fast.shape == eager.shape == (3, 21)
    assert torch.equal(fast, eager)


def test_static_generate_stops_at_end_tokens_and_reuses_its_buffers():
    model = tiny_model("gated", ["linear_attention", "full_attention"])
    ids, mask = _left_padded(seed=1)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    # An end token that every row produces at some point, late enough that rows end at different steps.
    new = free[:, 9:]
    common = [t for t in new[0].tolist() if all(t in row.tolist() for row in new)]
    assert common, "the test needs a token every row generates"
    eos = common[0]
    eager = model.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    fast = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=16,
        eos_token_id=eos,
        pad_token_id=0,
        cache_implementation="static",
    )
    assert torch.equal(fast, eager)
    decoder = model._lasp_graph_decoder
    # A second prompt of the same batch size and a fitting length reuses the decoder (and, on a GPU, its
    # graph).
    other, other_mask = _left_padded(seed=2)
    again = model.generate(other, attention_mask=other_mask, max_new_tokens=10, cache_implementation="static")
    assert model._lasp_graph_decoder is decoder
    assert torch.equal(
        again, model.generate(other, attention_mask=other_mask, max_new_tokens=10, do_sample=False)
    )
    # A copy of the model (or a pickled one) does not share the decoder: it makes its own.
    assert copy.deepcopy(model)._lasp_graph_decoder is None
    assert pickle.loads(pickle.dumps(model))._lasp_graph_decoder is None
    # Casting the model moves its weights: a captured step would read the old ones, so a new decoder is made.
    model.bfloat16()
    model.generate(other, attention_mask=other_mask, max_new_tokens=3, cache_implementation="static")
    assert model._lasp_graph_decoder is not decoder


@pytest.mark.parametrize("mixer, layer_types", [CASES[0], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[3]])
def test_static_generate_after_a_chunked_prompt(mixer, layer_types):
    model = tiny_model(mixer, layer_types, prompt_chunk_size=4)
    ids = torch.randint(1, VOCAB, (2, 19))
    fast = model.generate(ids, max_new_tokens=8, cache_implementation="static")
    model.config.prompt_chunk_size = None
    assert torch.equal(fast, model.generate(ids, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize(
    "extra", [{"position_encoding": "rope"}, {"position_encoding": "lrpe"}], ids=["rope", "lrpe"]
)
def test_static_generate_with_position_encodings(extra):
    """Linear layers with a position encoding read the step's position from the fixed positions buffer."""
    model = tiny_model("lightning", ["linear_attention", "full_attention"], **extra)
    ids, mask = _left_padded()
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=8, cache_implementation="static")
    assert torch.equal(fast, eager)


def test_static_generate_rejects_what_it_does_not_do():
    model = tiny_model("lightning")
    ids = torch.randint(1, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="do_sample"):
        model.generate(ids, max_new_tokens=3, do_sample=True, cache_implementation="static")
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, max_new_tokens=3, num_beams=2, cache_implementation="static")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=0, cache_implementation="static")


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and per-function state empty before and after (compiled code and the sizes it has seen
    belong to the model's forward, shared by every model: another test's compilation must not start from them)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend (Inductor) needs a C++ compiler")
@pytest.mark.parametrize("mixer, layer_types", [CASES[0], CASES[3], CASES[5]],
                         ids=[CASE_IDS[0], CASE_IDS[3], CASE_IDS[5]])
def test_compiled_step_equals_eager_generate(mixer, layer_types, fresh_dynamo):
    """The decoder's step through torch.compile (`LaspGraphDecoder(compile=True)`, what generate_static runs with
    a compile_config) gives eager generate's greedy tokens (float32), and compiles once: the static cache's host
    token count stays put, so later steps hit the first compilation."""
    model = tiny_model(mixer, layer_types)
    ids, mask = _left_padded()
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        prefill = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    hybrid = "full_attention" in model.config.layer_types
    decoder = LaspGraphDecoder(model, _cache_of(prefill), 256 if hybrid else 0, compile=True)
    decoder.set_tokens([], 0)
    decoder.start(_cache_of(prefill), mask, prefill.logits[:, -1].argmax(dim=-1), 10)
    with torch.no_grad():
        decoder._step()  # the first compilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        decoder.start(_cache_of(prefill), mask, prefill.logits[:, -1].argmax(dim=-1), 10)
        fast = decoder.run(10)
    assert torch.equal(torch.cat([ids, fast], dim=1), eager)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend (Inductor) needs a C++ compiler")
def test_static_generate_takes_a_compile_config(fresh_dynamo):
    """`compile_config` compiles the step (a decoder of its own, reused for the same config); disable_compile wins;
    anything but a CompileConfig is refused."""
    from transformers import CompileConfig

    model = tiny_model("lightning")
    ids, mask = _left_padded()
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    config = CompileConfig()
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=6, cache_implementation="static",
                          compile_config=config)
    assert torch.equal(fast, eager)
    decoder = model._lasp_graph_decoder
    assert decoder.compiled == ("inductor", False) and decoder.forward is not model
    model.generate(ids, attention_mask=mask, max_new_tokens=6, cache_implementation="static", compile_config=config)
    assert model._lasp_graph_decoder is decoder
    model.generate(ids, attention_mask=mask, max_new_tokens=6, cache_implementation="static", compile_config=config,
                   disable_compile=True)
    assert model._lasp_graph_decoder.compiled is None and model._lasp_graph_decoder.forward is model
    with pytest.raises(ValueError, match="CompileConfig"):
        model.generate(ids, max_new_tokens=3, cache_implementation="static", compile_config={"backend": "eager"})
