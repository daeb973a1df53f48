"""Inputs outside the op's and the model's contract raise a ValueError naming the input and what is expected,
instead of inf / NaN or a bare torch error from deep inside (the 'before' of each case is in its docstring)."""

import pytest
import torch

import lasp_hf
from lasp_hf import LaspConfig, LaspForCausalLM


def _qkv(B=1, T=70, H=2, K=8, V=8):
    return torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf")])
def test_positive_or_nan_token_decay_is_refused_with_its_position(backend, bad):
    """Before: accepted, and o grew to inf / NaN for longer T."""
    q, k, v = _qkv()
    g = torch.full((1, 70, 2), -0.1)
    g[0, 65, 1] = bad
    with pytest.raises(ValueError, match=rf"g must be a natural-log decay <= 0.*got {bad} at g\[0, 65, 1\]"):
        lasp_hf.linear_attention(q, k, v, g, backend=backend)


def test_positive_head_decay_is_refused_in_the_op_and_the_decoding_step():
    q, k, v = _qkv()
    g = torch.tensor([-0.1, 0.3])
    with pytest.raises(ValueError, match=r"got 0.3.* at g\[1\]"):
        lasp_hf.linear_attention(q, k, v, g)
    with pytest.raises(ValueError, match=r"got 0.3.* at g\[1\]"):
        lasp_hf.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g)


def test_a_decay_fixed_in_place_is_checked_again():
    """The per-tensor cache of checked decays follows in-place updates (the tensor's version)."""
    q, k, v = _qkv()
    g = torch.tensor([-0.1, -0.3])
    lasp_hf.linear_attention(q, k, v, g)
    g[0] = 2.0
    with pytest.raises(ValueError, match=r"at g\[0\]"):
        lasp_hf.linear_attention(q, k, v, g)


def test_zero_and_minus_inf_decays_are_accepted():
    q, k, v = _qkv()
    o, _ = lasp_hf.linear_attention(q, k, v, torch.tensor([0.0, float("-inf")]))
    assert torch.isfinite(o).all()


def test_integer_inputs_to_the_decoding_step_are_refused():
    """Before: int64 results, silently."""
    q = torch.ones(1, 2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="q must be float32, bfloat16 or float16, got torch.int64"):
        lasp_hf.linear_attention_step(q, q, q)


def test_zero_head_dim_is_refused():
    """Before: ZeroDivisionError from K ** -0.5."""
    with pytest.raises(ValueError, match="K = 0"):
        lasp_hf.linear_attention_step(torch.ones(1, 2, 0), torch.ones(1, 2, 0), torch.ones(1, 2, 4))
    with pytest.raises(ValueError, match="K = 0"):
        lasp_hf.linear_attention(torch.ones(1, 3, 2, 0), torch.ones(1, 3, 2, 0), torch.ones(1, 3, 2, 4))


def test_zero_batch_rows_are_refused_by_the_op():
    with pytest.raises(ValueError, match="B = 0"):
        lasp_hf.linear_attention(*_qkv(B=0))


def _model():
    return LaspForCausalLM(LaspConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      head_dim=8, intermediate_size=32))


def test_input_ids_outside_the_vocabulary_are_refused_with_their_position():
    """Before: torch's 'IndexError: index out of range in self' from the embedding."""
    ids = torch.randint(0, 32, (2, 6))
    ids[1, 4] = 32
    with pytest.raises(ValueError, match=r"input_ids must hold ids in \[0, vocab_size = 32\); got 32 at input_ids\[1, 4\]"):
        _model()(input_ids=ids)
    ids[1, 4] = -1
    with pytest.raises(ValueError, match=r"got -1 at input_ids\[1, 4\]"):
        _model()(input_ids=ids)


def test_labels_outside_the_vocabulary_are_refused():
    ids = torch.randint(0, 32, (1, 6))
    labels = ids.clone()
    labels[0, 0] = -100  # ignored: fine
    labels[0, 3] = 40
    with pytest.raises(ValueError, match=r"labels must hold ids in \[0, vocab_size = 32\) or -100; got 40 at labels\[0, 3\]"):
        _model()(input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match=r"got 40 at shift_labels\[0, 3\]"):
        _model()(input_ids=ids, shift_labels=labels)


def test_a_batch_of_zero_rows_is_refused():
    """Before: a reshape RuntimeError in layers_lasp.py."""
    with pytest.raises(ValueError, match="B = 0"):
        _model()(input_ids=torch.zeros(0, 6, dtype=torch.long))
