"""Memory savers for very long sequences, on CPU: the chunked channel mixer (`config.mlp_chunk_size`) and the
chunked token-wise parts of the linear-attention block (`config.attention_chunk_size`) against the unchunked
model (logits and every parameter gradient; padded, packed, cached), the proof that the chunked tensors are not
kept whole, and `recipes/max_seq_len.py` with `--mlp_chunk_size`, `--attention_chunk_size` and `--fsdp`."""

import gc
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import weakref

import pytest
import torch
from lasp_hf import LaspForCausalLM
from test_modeling_common import VOCAB, rel_err, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
B, T = 2, 29  # T is not a multiple of the chunk sizes below
# (token_mixer, layer_types, channel_mixer, norm_type): the TransNormerLLM block (no norm weight), and a hybrid with
# SwiGLU and weighted RMSNorms so that the chunked norm's weight gets a gradient too.
BLOCKS = [
    ("lightning", None, "sglu", "srmsnorm"),
    ("gated", ["linear_attention", "full_attention"], "swiglu", "rmsnorm"),
]
BLOCK_IDS = ["lightning-sglu", "hybrid-gated-swiglu"]


def _pair(block, chunk_size, seed=0, **chunking):
    """The same weights twice: without and with `mlp_chunk_size` (and the `chunking` fields)."""
    token_mixer, layer_types, channel_mixer, norm_type = block
    return _same_weights(
        {"token_mixer": token_mixer, "layer_types": layer_types, "channel_mixer": channel_mixer,
         "norm_type": norm_type},
        {"mlp_chunk_size": chunk_size, **chunking},
        seed,
    )


def _same_weights(kwargs, chunking, seed=0):
    """Two models of `tiny_config(**kwargs)` with the same weights, the second with the `chunking` fields."""
    torch.manual_seed(seed)
    reference = LaspForCausalLM(tiny_config(**kwargs))
    chunked = LaspForCausalLM(tiny_config(**kwargs, **chunking))
    chunked.load_state_dict(reference.state_dict())
    with torch.no_grad():  # unit norm weights would not tell a wrong weight gradient from a right one
        for model in (reference, chunked):
            for name, param in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    param.copy_(torch.linspace(0.5, 1.5, param.numel()))
    return reference, chunked


def _logits_and_grads(model, ids, probe, checkpointing, **inputs):
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()
    logits = model(input_ids=ids, use_cache=False, **inputs).logits
    (logits * probe).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("key", ["mlp_chunk_size", "attention_chunk_size"])
@pytest.mark.parametrize("value", [0, -4, 2.5, True, "64"])
def test_bad_chunk_size_raises(key, value):
    with pytest.raises(ValueError, match=key):
        tiny_config(**{key: value})


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "layer-checkpointing"])
@pytest.mark.parametrize("chunk_size", [8, 64], ids=["4-chunks", "1-chunk"])
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_chunked_mlp_matches_unchunked(block, chunk_size, checkpointing):
    reference, chunked = _pair(block, chunk_size)
    _assert_same_logits_and_grads(reference, chunked, checkpointing, input_ids=torch.randint(1, VOCAB, (B, T)))


def test_chunked_mlp_matches_unchunked_without_grad():
    reference, chunked = _pair(BLOCKS[1], 8)
    ids = torch.randint(1, VOCAB, (B, T))
    with torch.no_grad():
        assert rel_err(chunked.eval()(ids).logits, reference.eval()(ids).logits) <= 1e-5


def _saved_shapes(model, ids):
    """The shapes of the tensors autograd keeps for the backward outside any checkpoint (a checkpoint's own hooks
    take the tensors saved inside it)."""
    shapes = set()

    def pack(tensor):
        shapes.add(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, use_cache=False).logits.square().mean()
    loss.backward()
    return shapes


def test_chunked_mlp_keeps_no_intermediate_tensor_whole():
    reference, chunked = _pair(BLOCKS[0], 8)
    whole = (B, T, reference.config.intermediate_size)
    ids = torch.randint(1, VOCAB, (B, T))
    assert whole in _saved_shapes(reference.train(), ids)
    assert not any(shape[-2:] == whole[-2:] for shape in _saved_shapes(chunked.train(), ids))


def test_chunked_mlp_under_layer_checkpointing_keeps_no_hidden_state_alive():
    # The chunks' checkpoints save their inputs (slices of the block's mid hidden state) through the layer
    # checkpoint's hooks, so after the forward the mid hidden states are gone, as without chunks.
    _, chunked = _pair(BLOCKS[0], 8)
    chunked.train().activation_checkpointing_enable()
    mids = []
    for layer in chunked.model.layers:
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda module, args: mids.append(weakref.ref(args[0]._base))
        )
    logits = chunked(input_ids=torch.randint(1, VOCAB, (B, T)), use_cache=False).logits
    gc.collect()
    assert len(mids) == 2 * 4 and all(mid() is None for mid in mids)
    assert logits.requires_grad


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "layer-checkpointing"])
def test_chunked_mlp_runs_every_gate_on_one_chunk_in_forward_and_backward(checkpointing):
    _, chunked = _pair(BLOCKS[0], 8)
    chunked.train()
    if checkpointing:
        chunked.activation_checkpointing_enable()
    calls = []
    for layer_idx, layer in enumerate(chunked.model.layers):
        layer.channel_mixer.gate_proj.register_forward_hook(
            lambda module, args, out, layer_idx=layer_idx: calls.append((layer_idx, out.shape[1]))
        )
    logits = chunked(input_ids=torch.randint(1, VOCAB, (B, T)), use_cache=False).logits
    assert calls == [(layer_idx, length) for layer_idx in (0, 1) for length in (8, 8, 8, 5)]
    calls.clear()
    logits.sum().backward()
    # The backward recomputes the gate chunk by chunk (every chunk at least once per layer), never whole.
    for layer_idx in (0, 1):
        lengths = [length for idx, length in calls if idx == layer_idx]
        assert set(lengths) == {8, 5} and len(lengths) >= 4, lengths


# ---- attention_chunk_size -------------------------------------------------------------------------------

# Every linear kind, and a hybrid whose softmax layer stays unchunked: tnl-1b's lightning block (identity output
# gate, no norm weight), basic linear attention (elu + 1, weighted norms), gated (per-token decay, sigmoid gate),
# and (last) fla's GLA parts (per-key-channel decay, values twice the keys, per-head norm, swish gate).
ATTENTION_BLOCKS = [
    {"token_mixer": "lightning", "output_gate_act": "identity"},
    {"token_mixer": "linear", "norm_type": "rmsnorm", "channel_mixer": "swiglu"},
    {"token_mixer": "gated", "norm_type": "rmsnorm"},
    {"token_mixer": "lightning", "layer_types": ["full_attention", "linear_attention"], "norm_type": "rmsnorm",
     "output_gate_act": "silu"},
    {"token_mixer": "gla", "value_head_dim": 16, "output_norm": "per_head", "output_gate_act": "silu",
     "norm_type": "rmsnorm", "channel_mixer": "swiglu"},
]
ATTENTION_BLOCK_IDS = ["lightning", "linear", "gated", "hybrid-lightning", "gla"]


def _attention_pair(block, chunk_size, **more):
    return _same_weights(block, {"attention_chunk_size": chunk_size, **more})


def _assert_same_logits_and_grads(reference, chunked, checkpointing=False, *, input_ids, **inputs):
    probe = torch.randn(*input_ids.shape, VOCAB)
    ref_logits, ref_grads = _logits_and_grads(reference, input_ids, probe, checkpointing, **inputs)
    logits, grads = _logits_and_grads(chunked, input_ids, probe, checkpointing, **inputs)
    assert rel_err(logits, ref_logits) <= 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        assert ref_grad is not None and grads[name] is not None, name
        assert rel_err(grads[name], ref_grad) <= 1e-5, name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "layer-checkpointing"])
@pytest.mark.parametrize("chunk_size", [8, 28], ids=["4-chunks", "28+1"])
@pytest.mark.parametrize("block", ATTENTION_BLOCKS, ids=ATTENTION_BLOCK_IDS)
def test_chunked_attention_matches_unchunked(block, chunk_size, checkpointing):
    reference, chunked = _attention_pair(block, chunk_size)
    _assert_same_logits_and_grads(reference, chunked, checkpointing, input_ids=torch.randint(1, VOCAB, (B, T)))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "layer-checkpointing"])
def test_chunked_attention_and_mlp_together_match_unchunked(checkpointing):
    reference, chunked = _attention_pair(ATTENTION_BLOCKS[2], 8, mlp_chunk_size=6)
    _assert_same_logits_and_grads(reference, chunked, checkpointing, input_ids=torch.randint(1, VOCAB, (B, T)))


@pytest.mark.parametrize("block", ATTENTION_BLOCKS, ids=ATTENTION_BLOCK_IDS)
def test_chunked_attention_with_padding_matches_unchunked(block):
    # Left pads in row 1 and right pads in row 0, so chunks hold pads and real tokens alike.
    reference, chunked = _attention_pair(block, 8)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -6:] = 0
    mask[1, :11] = 0
    ids = torch.randint(1, VOCAB, (B, T)) * mask
    _assert_same_logits_and_grads(reference, chunked, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("block", ATTENTION_BLOCKS, ids=ATTENTION_BLOCK_IDS)
def test_chunked_attention_with_packed_documents_matches_unchunked(block):
    # Documents of 10, 13 and 6 tokens: boundaries inside chunks and on none of their edges.
    reference, chunked = _attention_pair(block, 8)
    positions = torch.cat([torch.arange(n) for n in (10, 13, 6)])[None]
    ids = torch.randint(1, VOCAB, (1, T))
    _assert_same_logits_and_grads(reference, chunked, input_ids=ids, position_ids=positions)


@pytest.mark.parametrize("block", [ATTENTION_BLOCKS[2], ATTENTION_BLOCKS[3]], ids=["gated", "hybrid-lightning"])
def test_chunked_attention_prefill_with_cache_under_grad_then_decode(block):
    # A prefill with gradients on (so chunked) fills the cache; the decode steps after it (T == 1, unchunked)
    # and their cache match the unchunked model's.
    reference, chunked = _attention_pair(block, 8)
    ids = torch.randint(1, VOCAB, (B, T + 4))
    logits = {}
    for name, model in (("reference", reference), ("chunked", chunked)):
        model.train()
        out = model(input_ids=ids[:, :T], use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        steps = [out.logits]
        with torch.no_grad():
            for t in range(T, T + 4):
                out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits)
        logits[name] = torch.cat(steps, dim=1).detach()
    assert rel_err(logits["chunked"], logits["reference"]) <= 1e-5


@pytest.mark.parametrize("block", ATTENTION_BLOCKS, ids=ATTENTION_BLOCK_IDS)
def test_generate_with_attention_chunk_size_equals_without(block):
    reference, chunked = _attention_pair(block, 4)
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids * mask
    outputs = [
        model.eval().generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for model in (reference, chunked)
    ]
    assert outputs[0].shape == (2, 15) and torch.equal(outputs[1], outputs[0])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "layer-checkpointing"])
def test_chunked_attention_projects_and_outputs_one_chunk_at_a_time(checkpointing):
    _, chunked = _attention_pair(ATTENTION_BLOCKS[0], 8)
    chunked.train()
    if checkpointing:
        chunked.activation_checkpointing_enable()
    calls = []
    for layer_idx, layer in enumerate(chunked.model.layers):
        for name in ("q_proj", "u_proj", "o_proj"):
            getattr(layer.token_mixer, name).register_forward_hook(
                lambda module, args, out, key=(layer_idx, name): calls.append((*key, args[0].shape[1]))
            )
    logits = chunked(input_ids=torch.randint(1, VOCAB, (B, T)), use_cache=False).logits
    expected = [
        (idx, name, n) for idx in (0, 1) for part in (("q_proj",), ("u_proj", "o_proj"))
        for n in (8, 8, 8, 5) for name in part
    ]
    assert calls == expected
    calls.clear()
    logits.sum().backward()
    # The backward recomputes the projections chunk by chunk (every chunk at least once per layer), never whole;
    # o_proj only if at all (its output is saved by nothing, so the checkpoints' recompute may stop before it).
    for key in [(idx, name) for idx in (0, 1) for name in ("q_proj", "u_proj", "o_proj")]:
        lengths = [n for *k, n in calls if tuple(k) == key]
        if key[1] == "o_proj":
            assert set(lengths) <= {8, 5}, (key, lengths)
        else:
            assert set(lengths) == {8, 5} and len(lengths) >= 4, (key, lengths)


def test_attention_is_not_chunked_without_grad_or_within_one_chunk():
    # Generation and eval (no grad), and calls of at most one chunk, run the projections on all tokens at once.
    _, chunked = _attention_pair(ATTENTION_BLOCKS[0], 8)
    lengths = []
    chunked.model.layers[0].token_mixer.q_proj.register_forward_hook(
        lambda module, args, out: lengths.append(args[0].shape[1])
    )
    with torch.no_grad():
        chunked.train()(input_ids=torch.randint(1, VOCAB, (B, T)), use_cache=False)
    chunked(input_ids=torch.randint(1, VOCAB, (B, 8)), use_cache=False)
    assert lengths == [T, 8]


def test_chunked_attention_keeps_no_pre_activation_or_normed_copy_alive():
    # After the forward (gradients on, no layer checkpointing: what one layer's recompute keeps for its backward)
    # the pre-activation q, the normed block inputs and the output norm's results are gone when chunked; the
    # unchunked model keeps them, so the check can fail.
    models = _attention_pair(ATTENTION_BLOCKS[0], 8)
    ids = torch.randint(1, VOCAB, (B, T))
    alive = {}
    for name, model in zip(("reference", "chunked"), models, strict=True):
        model.train()
        outs = []
        for layer in model.model.layers:
            for module in (layer.token_mixer.q_proj, layer.input_layernorm, layer.token_mixer.o_norm):
                module.register_forward_hook(lambda module, args, out, outs=outs: outs.append(weakref.ref(out)))
        logits = model(input_ids=ids, use_cache=False).logits
        gc.collect()
        assert logits.requires_grad and len(outs) >= 3 * 2
        alive[name] = sum(out() is not None for out in outs)
    assert alive["reference"] >= 3 * 2
    assert alive["chunked"] == 0


def _storages_saved_outside_the_op(layer, x, monkeypatch):
    """The distinct storages autograd keeps for the backward of `layer(x)` (no layer checkpointing), apart from
    what the linear-attention op keeps itself (its own hooks take those: it keeps q, k, v and more whatever the
    block does); and, by name, the storages of the block input, the op's output and the mid hidden state."""
    from lasp_hf.modeling import layers_lasp

    op = layers_lasp.linear_attention
    known = {"input": x.untyped_storage().data_ptr()}

    def op_with_own_hooks(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
            o, state = op(*args, **kwargs)
        known["op output"] = o.untyped_storage().data_ptr()
        return o, state

    def mid_hook(module, args):
        known["mid"] = args[0].untyped_storage().data_ptr()

    monkeypatch.setattr(layers_lasp, "linear_attention", op_with_own_hooks)
    handle = layer.post_attention_layernorm.register_forward_pre_hook(mid_hook)
    storages = set()

    def pack(tensor):
        storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    handle.remove()
    monkeypatch.undo()
    return storages, known


@pytest.mark.parametrize("block", ATTENTION_BLOCKS[:3], ids=ATTENTION_BLOCK_IDS[:3])
def test_chunked_attention_block_keeps_only_its_input_and_the_op_output(block, monkeypatch):
    # With both halves chunked, a layer keeps for its backward (besides what the op keeps) only the block input
    # and the op's output o (the attention chunks' inputs) and the mid hidden state (the MLP chunks' inputs): no
    # normed copy, projection, pre-activation q / k, gate or output norm. The unchunked block keeps those too.
    reference, chunked = _attention_pair(block, 8, mlp_chunk_size=8)
    x = torch.randn(B, T, chunked.config.hidden_size, requires_grad=True)
    storages, known = _storages_saved_outside_the_op(chunked.model.layers[0].train(), x, monkeypatch)
    assert len(known) == 3 and storages == set(known.values())
    storages, known = _storages_saved_outside_the_op(reference.model.layers[0].train(), x, monkeypatch)
    assert len(storages - set(known.values())) >= 5


# ---- recipes/max_seq_len.py ------------------------------------------------------------------------------


def _max_seq_len(*args, launcher=(sys.executable,), env=None):
    return subprocess.run(
        [*launcher, str(REPO / "recipes" / "max_seq_len.py"), *args],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def test_max_seq_len_with_chunked_mlp_and_attention_on_the_cpu(tmp_path):
    result_file = tmp_path / "result.json"
    result = _max_seq_len("--start", "64", "--max_block_size", "128", "--granularity", "64", "--mlp_chunk_size",
                          "48", "--attention_chunk_size", "40", "--offload_activations", "--json", str(result_file))
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("longest trainable block_size for tnl-tiny.json") and "chunked MLP (48 tokens)" in last
    assert "chunked attention projections (40 tokens)" in last
    record = json.loads(result_file.read_text())
    assert record["longest_block_size"] == 128 and record["mlp_chunk_size"] == 48 and not record["fsdp"]
    assert record["attention_chunk_size"] == 40
    assert "activations offloaded to CPU" in record["memory_savers"]


def test_max_seq_len_with_bf16_parameters_on_the_cpu(tmp_path):
    result_file = tmp_path / "result.json"
    result = _max_seq_len("--start", "64", "--max_block_size", "64", "--granularity", "64", "--model_dtype",
                          "bfloat16", "--json", str(result_file))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result_file.read_text())
    assert record["longest_block_size"] == 64
    assert "bfloat16 parameters, gradients and AdamW states" in record["memory_savers"]


def test_max_seq_len_rejects_bad_memory_flags():
    spec = importlib.util.spec_from_file_location("recipe_max_seq_len_for_savers", REPO / "recipes" / "max_seq_len.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with pytest.raises(ValueError, match="--fsdp"):
        recipe.main(["--fsdp"])
    with pytest.raises(ValueError, match="--mlp_chunk_size"):
        recipe.main(["--mlp_chunk_size", "0"])
    with pytest.raises(ValueError, match="--attention_chunk_size"):
        recipe.main(["--attention_chunk_size", "-1"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--memory_report records CUDA allocations"):
            recipe.main(["--memory_report", "report"])


def test_memory_report_lists_the_blocks_alive_at_the_peak_by_site_and_size():
    spec = importlib.util.spec_from_file_location("recipe_max_seq_len_report", REPO / "recipes" / "max_seq_len.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cpp = {"filename": "??", "line": 0, "name": "torch::unwind::unwind()"}  # C++ frames come first
    torch_frame = {"filename": "/x/site-packages/torch/nn/functional.py", "line": 10, "name": "linear"}
    ours = {"filename": "/repo/modeling/layers_lasp.py", "line": 200, "name": "_project"}
    loss = {"filename": "/repo/modeling/loss_lasp.py", "line": 30, "name": "chunked_loss"}
    mib = 2**20
    trace = [
        {"action": "alloc", "addr": 1, "size": 512 * mib, "frames": [cpp, torch_frame, ours]},
        {"action": "free_completed", "addr": 99, "size": 256 * mib},  # allocated before the step
        {"action": "alloc", "addr": 2, "size": 512 * mib, "frames": [ours]},
        {"action": "alloc", "addr": 3, "size": 256 * mib, "frames": [torch_frame, loss, ours]},
        {"action": "alloc", "addr": 4, "size": 128 * mib, "frames": []},
        # the peak: 1024 (held) - 256 + 512 + 512 + 256 + 128 MiB = 2176 MiB
        {"action": "free_completed", "addr": 2, "size": 512 * mib},
        {"action": "alloc", "addr": 5, "size": 256 * mib, "frames": [ours]},
        {"action": "oom", "size": 1024 * mib, "device_free": 10 * mib},
    ]
    lines = recipe.summarize_peak(trace, held_before=1024 * mib).splitlines()
    assert lines[0] == ("peak 2.12 GiB allocated (trace event 5 of 8): 0.75 GiB held from before the step, "
                        "1.38 GiB allocated in it")
    assert lines[1] == "out of memory asking for 1024.0 MiB (10.0 MiB free on the device)"
    rows = [line.split(None, 3) for line in lines[4:7]]
    assert rows == [["1.000", "2", "512.0", "/repo/modeling/layers_lasp.py:200 _project"],
                    ["0.250", "1", "256.0", "/repo/modeling/loss_lasp.py:30 chunked_loss"],
                    ["0.125", "1", "128.0", "(no Python frame recorded)"]]
    assert [line.split() for line in lines[9:]] == [["1.000", "2", "512.0"], ["0.250", "1", "256.0"],
                                                    ["0.125", "1", "128.0"]]


@pytest.mark.distributed
def test_max_seq_len_with_fsdp2_over_two_cpu_ranks(tmp_path):
    result_file = tmp_path / "result.json"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--")
    result = _max_seq_len("--start", "128", "--max_block_size", "128", "--granularity", "128", "--fsdp",
                          "--mlp_chunk_size", "32", "--json", str(result_file), launcher=torchrun,
                          env={"LASP_SEQUENCE_PARALLEL_SIZE": "2", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP2 (parameters, gradients, optimizer states / 2)" in result.stdout.strip().splitlines()[-1]
    record = json.loads(result_file.read_text())
    assert record["longest_block_size"] == 128 and record["fsdp"] and record["sequence_parallel_size"] == 2


def _recipe_fsdp2_gradients(ids, chunk_size):
    """One step as max_seq_len.py takes it under --fsdp: SP = 2, FSDP2 over both ranks, chunked MLP and attention
    block inside the layer checkpoints, activations offloaded; the full gradients (averaged over the 2 ranks)."""
    from lasp_hf.parallel import init_sequence_parallel
    from lasp_hf.parallel.sharding import shard_batch_for_sp

    spec = importlib.util.spec_from_file_location("recipe_max_seq_len_fsdp", REPO / "recipes" / "max_seq_len.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    _, model = _pair(BLOCKS[1], chunk_size, attention_chunk_size=chunk_size)
    model.train().activation_checkpointing_enable()
    sharded = recipe.shard_with_fsdp2(model, torch.float32)
    sp = init_sequence_parallel(2)
    batch = shard_batch_for_sp({"input_ids": ids, "labels": ids}, sp)
    with torch.autograd.graph.save_on_cpu():
        loss = sharded(**batch, loss_reduction="sum").loss
    loss.backward()
    return {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}


@pytest.mark.distributed
def test_recipe_fsdp2_with_chunked_mlp_and_attention_gives_the_unsharded_gradient():
    from distributed_utils import run_distributed

    ids = torch.randint(1, VOCAB, (1, 2 * T + 2))
    grads = run_distributed(_recipe_fsdp2_gradients, 2, ids, 8)[0]
    reference, _ = _pair(BLOCKS[1], 8)
    reference.train()(input_ids=ids, labels=ids, loss_reduction="sum").loss.backward()
    for name, p in reference.named_parameters():
        # FSDP2 averages the two ranks' gradients of their own slices' summed losses: half the full gradient.
        assert rel_err(2 * grads[name], p.grad) <= 1e-4, name
