"""`LaspPreTrainedModel.fuse_projections` (modeling/parts_lasp.py `FusedRows`): each block's q / k / v / gate and
GLU gate / up weights laid out as one tensor per group, computed in one product at inference. Checked against a
copy of the model that was never fused (float32: the same sums, in another kernel call): logits, cached states,
gradients in training, a cast, a save / load round trip, inference mode, and generate fusing by itself; and the
live activation memory of a long prompt and of decoding steps against the never-fused copy's."""

import copy

import pytest
import torch
from lasp_hf import LaspForCausalLM
from lasp_hf.modeling.parts_lasp import MAX_FUSED_ROWS
from test_modeling_common import CASE_IDS, CASES, VOCAB, rel_err, tiny_model
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

TOL = 1e-6


def _groups(model):
    for module in model.modules():
        for rows in (getattr(module, "qkvu", None), getattr(module, "gate_up", None)):
            if rows is not None:
                yield rows


def _is_one_block(rows) -> bool:
    """Each weight starts where the previous one ends, in one storage (pointers compared independently of
    FusedRows' own check)."""
    weights = [linear.weight for linear in rows.linears]
    storages = {w.untyped_storage().data_ptr() for w in weights}
    ends = [w.data_ptr() + w.numel() * w.element_size() for w in weights[:-1]]
    return len(storages) == 1 and all(end == w.data_ptr() for end, w in zip(ends, weights[1:], strict=True))


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_fused_model_equals_the_unfused_one(mixer, layer_types):
    plain = tiny_model(mixer, layer_types)
    model = copy.deepcopy(plain)
    params = dict(model.named_parameters())
    assert not any(_is_one_block(rows) for rows in _groups(model))
    assert model.fuse_projections() is model
    groups = list(_groups(model))
    assert groups and all(_is_one_block(rows) for rows in groups)
    assert all(rows.weight() is None for rows in groups)  # gradients on: one product per projection
    with torch.no_grad():
        assert all(rows.weight() is not None for rows in groups)
    # The same parameter objects and values; nothing new in the state dict.
    assert dict(model.named_parameters()) == params
    state, ref_state = model.state_dict(), plain.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)

    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        out, ref = model(ids, use_cache=True), plain(ids, use_cache=True)
        assert rel_err(out.logits, ref.logits) < TOL
        step = torch.randint(1, VOCAB, (2, 1))
        out = model(step, past_key_values=out.past_key_values, use_cache=True)
        ref = plain(step, past_key_values=ref.past_key_values, use_cache=True)
    assert rel_err(out.logits, ref.logits) < TOL
    for i, layer_type in enumerate(model.config.layer_types):
        if layer_type == "linear_attention":
            assert rel_err(out.past_key_values.get_state(i), ref.past_key_values.get_state(i)) < TOL


def test_training_after_fusing_reaches_every_parameter():
    plain = tiny_model("gated").train()
    model = copy.deepcopy(plain).fuse_projections()
    ids = torch.randint(1, VOCAB, (2, 12))
    model(ids, labels=ids).loss.backward()
    plain(ids, labels=ids).loss.backward()
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, grads[name].grad) < TOL, name
    # An optimizer step writes through the views: the group's block sees the new values.
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    rows = model.model.layers[0].token_mixer.qkvu
    with torch.no_grad():
        block = rows.weight()
    assert torch.equal(block, torch.cat([linear.weight.detach() for linear in rows.linears]))


def test_a_cast_undoes_the_fusion_and_fuse_again_redoes_it():
    plain = tiny_model("lightning")
    model = copy.deepcopy(plain).fuse_projections()
    model.bfloat16()
    plain.bfloat16()
    groups = list(_groups(model))
    with torch.no_grad():
        assert all(rows.weight() is None for rows in groups)  # separate tensors again: one product each
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)  # the same separate products
    model.fuse_projections()
    with torch.no_grad():
        assert all(_is_one_block(rows) and rows.weight().dtype == torch.bfloat16 for rows in groups)


def test_unfuse_gives_each_weight_its_own_tensor():
    plain = tiny_model("gla")
    model = copy.deepcopy(plain).fuse_projections()
    params = dict(model.named_parameters())
    assert model.unfuse_projections() is model
    groups = list(_groups(model))
    assert not any(_is_one_block(rows) for rows in groups)
    storages = [linear.weight.untyped_storage().data_ptr() for rows in groups for linear in rows.linears]
    assert len(set(storages)) == len(storages)
    assert dict(model.named_parameters()) == params
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        assert all(rows.weight() is None for rows in groups)
        assert torch.equal(model(ids).logits, plain(ids).logits)  # the same separate products as never fused


def test_fusing_under_inference_mode_keeps_the_parameters_trainable():
    model = tiny_model("lightning").train()
    with torch.inference_mode():
        model.fuse_projections()
    assert not any(p.is_inference() for p in model.parameters())
    ids = torch.randint(1, VOCAB, (1, 8))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].token_mixer.q_proj.weight.grad is not None


def test_save_and_load_after_fusing(tmp_path):
    model = tiny_model("gla").fuse_projections()
    model.save_pretrained(tmp_path)
    loaded = LaspForCausalLM.from_pretrained(tmp_path).eval()
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids).logits) < TOL


def test_generate_fuses_the_projections():
    model = tiny_model("lightning")
    plain = copy.deepcopy(model)
    ids = torch.randint(1, VOCAB, (2, 6))
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert all(_is_one_block(rows) for rows in _groups(model))
    # The unfused model's greedy tokens, decoded step by step without generate.
    tokens, cache = ids, None
    with torch.no_grad():
        step = ids
        for _ in range(5):
            result = plain(step, past_key_values=cache, use_cache=True)
            cache = result.past_key_values
            step = result.logits[:, -1:].argmax(dim=-1)
            tokens = torch.cat([tokens, step], dim=1)
    assert torch.equal(out, tokens)


def test_weights_without_memory_are_left_alone():
    """Meta weights (and, by the same check, sharded DTensors) are not plain tensors with memory: fuse_projections
    leaves them as they are."""
    with torch.device("meta"):
        model = tiny_model("lightning")
    before = {name: p for name, p in model.named_parameters()}
    model.fuse_projections()
    assert all(p.is_meta and p is before[name] for name, p in model.named_parameters())
    assert not any(rows.fuse() for rows in _groups(model))


def test_partitioned_weights_are_left_alone():
    """A weight whose data is an empty placeholder (DeepSpeed ZeRO-3 outside a gather) is not fused, and
    inference does not read a block from it."""
    model = tiny_model("lightning")
    mixer = model.model.layers[0].token_mixer
    mixer.q_proj.weight.data = torch.empty(0)
    assert not mixer.qkvu.fuse()
    with torch.no_grad():
        assert mixer.qkvu.weight() is None
    assert model.model.layers[1].token_mixer.qkvu.fuse()


class _Adapted(torch.nn.Module):
    """A projection wrapped the way an adapter library wraps one (the base layer plus a low-rank delta)."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base_layer = base
        self.down = torch.nn.Linear(base.in_features, 2, bias=False)
        self.up = torch.nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.up(self.down(x))


class _LinearSubclass(torch.nn.Linear):
    """A linear that computes something else from its weight (as a quantized linear does)."""

    def forward(self, x):
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("wrap", ["adapter", "subclass"])
def test_a_replaced_projection_runs_as_its_own_module(wrap):
    """After fusing, a projection replaced by an adapter's wrapper or a Linear subclass is no longer part of a
    block: inference calls the module, as an unfused model does (the block would skip what it adds)."""
    model = tiny_model("lightning").fuse_projections()
    plain = tiny_model("lightning")
    for m in (model, plain):
        torch.manual_seed(1)
        mixer = m.model.layers[0].token_mixer
        if wrap == "adapter":
            mixer.k_proj = _Adapted(mixer.k_proj)
        else:
            replacement = _LinearSubclass(mixer.k_proj.in_features, mixer.k_proj.out_features, bias=False)
            replacement.weight = mixer.k_proj.weight
            mixer.k_proj = replacement
    with torch.no_grad():
        assert model.model.layers[0].token_mixer.qkvu.weight() is None
        assert model.model.layers[1].token_mixer.qkvu.weight() is not None
        ids = torch.randint(1, VOCAB, (2, 9))
        assert rel_err(model(ids).logits, plain(ids).logits) < TOL
    model.unfuse_projections()  # the replaced group is left as it is, the others get their own tensors
    model.fuse_projections()
    assert not model.model.layers[0].token_mixer.qkvu.fuse()


class _LiveBytes(TorchDispatchMode):
    """The bytes of the storages that ops create inside the mode and that are still alive, looked at after every
    op (`peak`: their most at any op; `held()`: now), and the number of matrix products run. The model's
    parameters and buffers are not counted (the fused block's view of them is created inside the mode)."""

    PRODUCTS = (torch.ops.aten.linear, torch.ops.aten.matmul, torch.ops.aten.mm, torch.ops.aten.addmm)

    def __init__(self, model):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.live = {}  # StorageImpl address -> (weak reference, bytes)
        self.peak = self.products = 0

    def held(self) -> int:
        self.live = {key: (ref, n) for key, (ref, n) in self.live.items() if not ref.expired()}
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.products += func.overloadpacket in self.PRODUCTS
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.skip:
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live or self.live[ref.cdata][0].expired():
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
        self.peak = max(self.peak, self.held())
        return out


def _prefill(model, ids):
    with torch.inference_mode(), _LiveBytes(model) as memory:
        out = model(ids, use_cache=True)
        held = memory.held()  # the cache (states and the rollback window) and the logits
    return out, memory.peak, held


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_a_long_prompt_takes_no_more_memory_fused(mixer, layer_types):
    """A prompt of more rows than MAX_FUSED_ROWS, prefilled in two chunks: the fused model's live activations,
    at their peak and in the cache it returns, are no more than the never-fused copy's, and its logits are the
    same. (One product's views made the rollback window keep all of q / k / v / gate where it needs v.)"""
    plain = tiny_model(mixer, layer_types, prompt_chunk_size=MAX_FUSED_ROWS + 1)
    model = copy.deepcopy(plain).fuse_projections()
    ids = torch.randint(1, VOCAB, (1, 2 * MAX_FUSED_ROWS + 2))
    out, peak, held = _prefill(model, ids)
    ref, ref_peak, ref_held = _prefill(plain, ids)
    assert peak <= ref_peak and held <= ref_held, (peak, ref_peak, held, ref_held)
    assert torch.equal(out.logits, ref.logits)


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_decoding_steps_keep_no_more_memory_fused(mixer, layer_types):
    """Decoding steps of a batch run fused (fewer matrix products than the never-fused copy's), and the cache
    they leave, whose rollback window keeps each step's k and v, holds no more than the copy's."""
    plain = tiny_model(mixer, layer_types)
    model = copy.deepcopy(plain).fuse_projections()
    ids = torch.randint(1, VOCAB, (4, 5))
    counts = []
    for m in (model, plain):
        with torch.inference_mode(), _LiveBytes(m) as memory:
            cache = m(ids, use_cache=True).past_key_values
            products = memory.products
            step = ids[:, -1:]
            for _ in range(12):
                out = m(step, past_key_values=cache, use_cache=True)
                step = out.logits[:, -1:].argmax(dim=-1)
            del out
            counts.append((memory.products - products, memory.held()))
        del cache
    (products, held), (ref_products, ref_held) = counts
    assert products < ref_products
    assert held <= ref_held, (held, ref_held)
