"""The lasp model family on CPU: config checks, the token mixers against a float64 recurrence, the loss
against plain `F.cross_entropy`, padding and packing against unpadded / per-document runs, gradient
checkpointing, dtypes."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lasp_hf import LaspConfig, LaspForCausalLM, LaspModel
from lasp_hf.modeling.layers_lasp import LaspLinearAttention
from lasp_hf.modeling.modeling_lasp import chunked_cross_entropy
from test_modeling_common import CASE_IDS, CASES, VOCAB, rel_err, tiny_config, tiny_model


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(token_mixer="softmax"), "token_mixer"),
        (dict(channel_mixer="geglu"), "channel_mixer"),
        (dict(norm_type="layernorm"), "norm_type"),
        (dict(feature_map="relu"), "feature_map"),
        (dict(output_gate_act="tanh"), "output_gate_act"),
        (dict(layer_types=["linear_attention"]), "layer_types"),
        (dict(layer_types=["linear_attention", "sliding_attention"]), "sliding_attention"),
        (dict(hidden_size=30, num_attention_heads=4), "divisible"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(head_dim=0), "head_dim"),
        (dict(loss_chunk_size=0), "loss_chunk_size"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(gate_logit_normalizer=-1.0), "gate_logit_normalizer"),
        (dict(head_dim=7, layer_types=["full_attention", "linear_attention"]), "even head_dim"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
    ],
)
def test_bad_config_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_config_defaults_and_round_trip(tmp_path):
    config = tiny_config()
    assert config.head_dim == 8 and config.layer_types == ["linear_attention"] * 2
    config.save_pretrained(tmp_path)
    loaded = LaspConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_lightning_decay_follows_transnormer():
    config = tiny_config(num_hidden_layers=3, num_attention_heads=4)
    for layer_idx in range(3):
        decay = LaspLinearAttention(config, layer_idx).decay
        expected = [-(2.0 ** (-8.0 * (h + 1) / 4)) * (1 - layer_idx / 2 + 1e-5) for h in range(4)]
        torch.testing.assert_close(decay, torch.tensor(expected), rtol=1e-6, atol=0)
    one_layer = LaspLinearAttention(tiny_config(num_hidden_layers=1, layer_types=None), 0).decay
    torch.testing.assert_close(
        one_layer, -torch.tensor([2.0 ** (-2.0 * (h + 1)) for h in range(4)]) * (1 + 1e-5)
    )


def _recurrence(q, k, v, g, scale):
    """float64 step-by-step S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t; q, k, v [B, T, H, D]."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    out = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * (q[:, t, :, None, :] @ S).squeeze(-2))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize(
    "kind, gate", [("lightning", "identity"), ("lightning", "sigmoid"), ("linear", None), ("gated", "silu")]
)
def test_token_mixer_matches_float64_recurrence(kind, gate):
    config = tiny_config(kind, norm_type="rmsnorm", feature_map="elu", output_gate_act=gate or "sigmoid")
    mixer = LaspLinearAttention(config, layer_idx=1)
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 11, 32)
    out = mixer(x)

    xd = x.double()
    lin = lambda m: F.linear(xd, m.weight.double(), None if m.bias is None else m.bias.double())
    q, k, v = (lin(m).view(2, 11, 4, 8) for m in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    if kind == "lightning":
        q, k = F.silu(q), F.silu(k)
        H, L = 4, 2
        g = torch.tensor(
            [-(2.0 ** (-8.0 * (h + 1) / H)) * (1 - 1 / (L - 1) + 1e-5) for h in range(H)], dtype=torch.float64
        )
        g, scale = g.expand(2, 11, 4), 1.0
    elif kind == "linear":
        q, k = F.elu(q) + 1, F.elu(k) + 1
        g, scale = None, 8**-0.5
    else:
        low = F.linear(xd, mixer.decay_proj[0].weight.double())
        g = (
            F.logsigmoid(
                F.linear(low, mixer.decay_proj[1].weight.double(), mixer.decay_proj[1].bias.double())
            )
            / 16
        )
        scale = 8**-0.5
    o = _recurrence(q, k, v, g, scale).reshape(2, 11, 32)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * mixer.o_norm.weight.double()
    if gate is not None:
        u = lin(mixer.u_proj)
        o = {"identity": u, "sigmoid": torch.sigmoid(u), "silu": F.silu(u)}[gate] * o
    ref = F.linear(o, mixer.o_proj.weight.double())
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_forward_backward_shapes_and_every_parameter_learns(mixer, layer_types):
    model = tiny_model(mixer, layer_types).train()
    x = torch.randint(1, VOCAB, (2, 13))
    out = model(x, labels=x)
    assert out.logits is None and out.loss.shape == () and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    hidden = model.model(x).last_hidden_state
    assert hidden.shape == (2, 13, 32)
    assert model(x).logits.shape == (2, 13, VOCAB)


@pytest.mark.parametrize("mixer, layer_types", CASES[:1] + CASES[3:4], ids=["lightning", "hybrid"])
def test_loss_equals_plain_cross_entropy(mixer, layer_types):
    model = tiny_model(mixer, layer_types)
    x = torch.randint(1, VOCAB, (2, 21))
    labels = x.clone()
    labels[0, :4] = -100
    labels[1, -3:] = -100
    logits = model(x).logits.float()
    ref_sum = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
    num_valid = (labels[:, 1:] != -100).sum()

    assert rel_err(model(x, labels=labels).loss, ref_sum / num_valid) < 1e-5
    assert rel_err(model(x, labels=labels, loss_reduction="sum").loss, ref_sum) < 1e-5
    assert rel_err(model(x, labels=labels, num_items_in_batch=torch.tensor(50)).loss, ref_sum / 50) < 1e-5
    # shift_labels (already shifted) take precedence over labels.
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    garbage = torch.randint(0, VOCAB, x.shape)
    assert rel_err(model(x, labels=garbage, shift_labels=shift).loss, ref_sum / num_valid) < 1e-5
    assert rel_err(model(x, shift_labels=shift, num_items_in_batch=7).loss, ref_sum / 7) < 1e-5


def test_chunked_loss_gradients_equal_unchunked():
    x = torch.randint(1, VOCAB, (2, 29))
    grads = []
    for chunk in (3, 10_000):
        model = tiny_model("gated", loss_chunk_size=chunk).train()
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model = tiny_model("gated").train()
    logits = model(x).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert rel_err(grads[0][name], p.grad) < 1e-4, name
        assert rel_err(grads[1][name], p.grad) < 1e-4, name


def _full_cross_entropy(hidden, weight, labels, reduction, scale):
    """Reference: `F.cross_entropy` of all float64 logits at once, and its gradients times `scale`."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy((h @ w.T).reshape(-1, w.shape[0]), labels.reshape(-1), reduction=reduction)
    grad_h, grad_w = torch.autograd.grad(loss * scale, (h, w))
    return loss.detach(), grad_h, grad_w


def _labels_with_ignored_chunks():
    """`[3, 10]` labels over a vocabulary of 50; tokens 7..13 are ignored, so the chunks [7, 14) of 7 and
    [8, 12) of 4 have no valid label at all."""
    labels = torch.randint(0, 50, (3, 10))
    labels.view(-1)[7:14] = -100
    labels[2, ::4] = -100
    return labels


@pytest.mark.parametrize("trainable", ["both", "hidden", "weight"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 30, 1000])
def test_chunked_cross_entropy_matches_full(chunk_size, reduction, trainable):
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=trainable != "weight")
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=trainable != "hidden")
    labels = _labels_with_ignored_chunks()
    loss, num_valid = chunked_cross_entropy(hidden, weight, labels, chunk_size, reduction=reduction)
    (loss * 3.7).backward()
    ref, ref_grad_h, ref_grad_w = _full_cross_entropy(hidden, weight, labels, reduction, scale=3.7)
    assert num_valid.item() == (labels != -100).sum().item() and num_valid.dtype == torch.long
    assert loss.dtype == torch.float64 and rel_err(loss, ref) < 1e-12
    assert (hidden.grad is None) == (trainable == "weight")
    assert (weight.grad is None) == (trainable == "hidden")
    if hidden.grad is not None:
        assert hidden.grad.shape == hidden.shape and rel_err(hidden.grad, ref_grad_h) < 1e-12
    if weight.grad is not None:
        assert rel_err(weight.grad, ref_grad_w) < 1e-12


def test_chunked_cross_entropy_without_grad():
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    labels = _labels_with_ignored_chunks()
    ref = _full_cross_entropy(hidden, weight, labels, "sum", scale=1.0)[0]
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(hidden, weight, labels, 4)
    assert not loss.requires_grad and rel_err(loss, ref) < 1e-12
    loss, _ = chunked_cross_entropy(hidden.detach(), weight, labels, 4)
    assert not loss.requires_grad and rel_err(loss, ref) < 1e-12


def test_chunked_cross_entropy_float32():
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = _labels_with_ignored_chunks()
    loss, _ = chunked_cross_entropy(hidden, weight, labels, 7, reduction="mean")
    (loss * 3.7).backward()
    ref, ref_grad_h, ref_grad_w = _full_cross_entropy(hidden, weight, labels, "mean", scale=3.7)
    assert loss.dtype == hidden.grad.dtype == weight.grad.dtype == torch.float32
    # float32 rounds at 6e-8; sums of 16 products and softmaxes over 50 logits lose a few ulps (2e-7 here).
    assert rel_err(loss, ref) < 1e-6 and rel_err(hidden.grad, ref_grad_h) < 1e-6
    assert rel_err(weight.grad, ref_grad_w) < 1e-6


@pytest.mark.parametrize("params", ["float32 under autocast", "bfloat16"])
def test_chunked_cross_entropy_bfloat16(params):
    """bf16 matmuls and a float32 softmax, as `F.linear(...).float()` gives: against float64 and that."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if params == "bfloat16" else torch.float32
    hidden = torch.randn(4, 60, 64).to(dtype).requires_grad_()
    weight = (torch.randn(500, 64) / 8).to(dtype).requires_grad_()
    labels = torch.randint(0, 500, (4, 60))
    labels[1, 10:50] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=params != "bfloat16"):
        loss, _ = chunked_cross_entropy(hidden, weight, labels, 64, reduction="mean")
        plain = F.cross_entropy(F.linear(hidden, weight).float().reshape(-1, 500), labels.reshape(-1))
    (loss * 3.7).backward()
    ref, ref_grad_h, ref_grad_w = _full_cross_entropy(hidden, weight, labels, "mean", scale=3.7)
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == dtype
    # bf16 rounds at u = 2^-8: the inputs, the logits gradient and each gradient matmul's output are rounded
    # (u each at worst, u/2 on average), so each gradient is within 3u of float64; the loss, a mean of 200
    # token losses whose rounding errors partly cancel, is far closer. Measured: 3e-3 (grads), 3e-5 (loss).
    u = 2.0**-8
    assert rel_err(loss, ref) < u / 10
    assert rel_err(hidden.grad, ref_grad_h) < 3 * u and rel_err(weight.grad, ref_grad_w) < 3 * u
    # The same bf16 logits as the plain matmul (only float32 summation order differs); float32 logits would be
    # as far from `plain` as float64 ones, 3e-5 here.
    assert rel_err(loss, plain) < 1e-6


def test_chunked_cross_entropy_never_materializes_full_logits():
    """Forward and backward create nothing of `[T, vocab]` size, and keep only `[T, D]` and `[vocab, D]`
    tensors (the two gradients) for the backward pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    T, D, vocab, chunk = 256, 8, 400, 16
    hidden = torch.randn(T, D, requires_grad=True)
    weight = torch.randn(vocab, D, requires_grad=True)
    labels = torch.randint(0, vocab, (T,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with LargestOutput() as largest, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk)
        loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    assert sorted(saved) == [T * D, vocab * D]
    assert largest.numel <= max(T * D, vocab * D, chunk * vocab) < T * vocab


def test_chunked_cross_entropy_bad_input():
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(
            torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long), reduction="none"
        )
    with pytest.raises(ValueError, match="shift_labels"):
        chunked_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        chunked_cross_entropy(
            torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
        )


def test_logits_to_keep():
    model = tiny_model("lightning")
    x = torch.randint(1, VOCAB, (2, 9))
    full = model(x).logits
    assert rel_err(model(x, logits_to_keep=3).logits, full[:, -3:]) < 1e-6
    index = torch.tensor([0, 4, 8])
    assert rel_err(model(x, logits_to_keep=index).logits, full[:, index]) < 1e-6
    with_loss = model(x, labels=x, logits_to_keep=1)
    assert with_loss.loss is not None and rel_err(with_loss.logits, full[:, -1:]) < 1e-6
    assert model(x, labels=x).logits is None


def test_bad_forward_input_raises():
    model = tiny_model("lightning")
    x = torch.randint(1, VOCAB, (2, 9))
    with pytest.raises(ValueError, match="loss_reduction"):
        model(x, labels=x, loss_reduction="none")
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="batch size 1"):
        model(x, cu_seq_lens_q=torch.tensor([0, 4, 9]), use_cache=False)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_padded_equals_unpadded(mixer, layer_types, side):
    model = tiny_model(mixer, layer_types)
    lengths = [11, 6, 1]
    seqs = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols] = s
        mask[i, cols] = 1
    padded = model(ids, attention_mask=mask, use_cache=False).logits
    for i, s in enumerate(seqs):
        alone = model(s[None], use_cache=False).logits[0]
        got = padded[i][mask[i].bool()]
        assert rel_err(got, alone) < 1e-4, (i, side)


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_packed_equals_per_document(mixer, layer_types):
    model = tiny_model(mixer, layer_types)
    docs = [torch.randint(1, VOCAB, (n,)) for n in (7, 1, 12, 5)]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    alone = torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])
    packed = model(ids, position_ids=position_ids).logits[0]  # eval mode: no cache is made for packed rows
    assert rel_err(packed, alone) < 1e-4
    cu = torch.tensor([0, 7, 8, 20, 25], dtype=torch.int32)
    via_cu = model(ids, position_ids=position_ids, cu_seq_lens_q=cu, use_cache=False).logits[0]
    assert rel_err(via_cu, alone) < 1e-4
    # Packed loss equals the per-document losses (no label crosses a boundary once they are masked).
    labels = torch.cat([F.pad(d[1:], (0, 1), value=-100) for d in docs])[None]
    loss_sum = model(
        ids, position_ids=position_ids, shift_labels=labels, loss_reduction="sum", use_cache=False
    ).loss
    ref = sum(model(d[None], labels=d[None], loss_reduction="sum", use_cache=False).loss for d in docs)
    assert rel_err(loss_sum, ref) < 1e-4


def test_softmax_layers_sdpa_equals_eager():
    x = torch.randint(1, VOCAB, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    outs = []
    for impl in ("sdpa", "eager"):
        model = tiny_model("lightning", ["full_attention", "full_attention"], attn_implementation=impl)
        assert model.config._attn_implementation == impl
        outs.append(model(x, attention_mask=mask, use_cache=False).logits[mask.bool()])
    assert rel_err(outs[0], outs[1]) < 1e-5


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("mixer, layer_types", [CASES[0], CASES[4], CASES[5]], ids=["lightning", "hybrid-gated", "gla"])
def test_gradient_checkpointing_gives_same_gradients(mixer, layer_types, use_reentrant):
    x = torch.randint(1, VOCAB, (2, 15))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(mixer, layer_types).train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
            )
            assert model.model.layers[0].gradient_checkpointing
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert rel_err(grads[1][name], grads[0][name]) < 1e-5, name


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_half_precision_forward_backward(mixer, layer_types, dtype, tol):
    model = tiny_model(mixer, layer_types).to(dtype)
    # Reference: the same (rounded) weights run in float32, so the error measured is the half-precision
    # compute.
    reference = copy.deepcopy(model).float()
    x = torch.randint(1, VOCAB, (2, 17))
    logits = model(x).logits
    assert logits.dtype == dtype
    # Two blocks, each a few half-precision matmuls and norms deep (about 2^-8 (bf16) / 2^-11 (fp16) per
    # rounding).
    assert rel_err(logits.float(), reference(x).logits) < tol
    for layer in model.model.layers:
        if getattr(layer.token_mixer, "decay", None) is not None:
            assert layer.token_mixer.decay.dtype == torch.float32
    out = model.train()(x, labels=x)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_sp_context_rejects_padding_cache_and_unshifted_labels():
    model = tiny_model("lightning")
    x = torch.randint(1, VOCAB, (1, 8))
    sp = object()  # rejected before the context is used
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padded"):
        model(x, attention_mask=mask, sp_context=sp)
    with pytest.raises(ValueError, match="cache"):
        model(x, use_cache=True, sp_context=sp)
    with pytest.raises(ValueError, match="shift_labels"):
        model(x, labels=x, sp_context=sp)
    restarting = torch.tensor([[5, 6, 7, 0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(x, position_ids=restarting, sp_context=SimpleNamespace(rank=0, mode="ring"))
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(x, position_ids=torch.arange(8)[None], sp_context=SimpleNamespace(rank=1, mode="ring"))


def test_outputs_hidden_states_tuples_and_embeds():
    model = tiny_model("gated", ["linear_attention", "full_attention"])
    x = torch.randint(1, VOCAB, (2, 7))
    out = model(x, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (2, 7, 32)
    as_tuple = model(x, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and rel_err(as_tuple[0], out.logits) < 1e-6
    from_embeds = model(inputs_embeds=model.model.embed_tokens(x)).logits
    assert rel_err(from_embeds, out.logits) < 1e-6


def test_tied_embeddings():
    model = tiny_model("lightning", tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = tiny_model("lightning", tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_init_weights():
    model = tiny_model(
        "gated",
        layer_types=["linear_attention", "full_attention"],
        initializer_range=0.02,
        norm_type="rmsnorm",
    )
    std = model.model.layers[0].token_mixer.q_proj.weight.std().item()
    assert math.isclose(std, 0.02, rel_tol=0.15)
    assert (model.model.layers[0].token_mixer.decay_proj[1].bias == 0).all()
    assert (model.model.norm.weight == 1).all()
    assert (model.model.embed_tokens.weight[0] == 0).all()  # pad_token_id row
    assert isinstance(model.model, LaspModel) and isinstance(model, LaspForCausalLM)
