"""Tiny configs and helpers shared by the modeling tests (as transformers' causal_lm_tester: hidden 32,
2 layers).

No tests here: the test_modeling_*.py files import it."""

import torch
from lasp_hf import LaspConfig, LaspForCausalLM

VOCAB = 97
MIXERS = ("lightning", "linear", "gated")
# (token_mixer, layer_types) cases: each linear kind, and a hybrid with a softmax layer.
CASES = [(m, None) for m in MIXERS] + [
    ("lightning", ["full_attention", "linear_attention"]),
    ("gated", ["linear_attention", "full_attention"]),
    ("gla", None),  # appended last: tests pick cases by index
]
CASE_IDS = ["lightning", "linear", "gated", "hybrid-lightning", "hybrid-gated", "gla"]


def tiny_config(token_mixer="lightning", layer_types=None, **overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        token_mixer=token_mixer,
        layer_types=layer_types,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        loss_chunk_size=16,
    )
    kwargs.update(overrides)
    return LaspConfig(**kwargs)


def tiny_model(token_mixer="lightning", layer_types=None, seed=0, **overrides):
    torch.manual_seed(seed)
    return LaspForCausalLM(tiny_config(token_mixer, layer_types, **overrides)).eval()


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()
