"""Memory savers for very long sequences, on CPU: the chunked channel mixer (`config.mlp_chunk_size`) against
the unchunked model (logits and every parameter gradient), the proof that its `[T, intermediate_size]` tensors
are not kept whole, and `recipes/max_seq_len.py` with `--mlp_chunk_size` and `--fsdp`."""

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


def _pair(block, chunk_size, seed=0):
    """The same weights twice: without and with `mlp_chunk_size`."""
    token_mixer, layer_types, channel_mixer, norm_type = block
    kwargs = {"channel_mixer": channel_mixer, "norm_type": norm_type}
    torch.manual_seed(seed)
    reference = LaspForCausalLM(tiny_config(token_mixer, layer_types, **kwargs))
    chunked = LaspForCausalLM(tiny_config(token_mixer, layer_types, mlp_chunk_size=chunk_size, **kwargs))
    chunked.load_state_dict(reference.state_dict())
    with torch.no_grad():  # unit norm weights would not tell a wrong weight gradient from a right one
        for model in (reference, chunked):
            for name, param in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    param.copy_(torch.linspace(0.5, 1.5, param.numel()))
    return reference, chunked


def _logits_and_grads(model, ids, probe, checkpointing):
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()
    logits = model(input_ids=ids, use_cache=False).logits
    (logits * probe).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("value", [0, -4, 2.5, True, "64"])
def test_bad_mlp_chunk_size_raises(value):
    with pytest.raises(ValueError, match="mlp_chunk_size"):
        tiny_config(mlp_chunk_size=value)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "layer-checkpointing"])
@pytest.mark.parametrize("chunk_size", [8, 64], ids=["4-chunks", "1-chunk"])
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_chunked_mlp_matches_unchunked(block, chunk_size, checkpointing):
    reference, chunked = _pair(block, chunk_size)
    ids = torch.randint(1, VOCAB, (B, T))
    probe = torch.randn(B, T, VOCAB)
    ref_logits, ref_grads = _logits_and_grads(reference, ids, probe, checkpointing)
    logits, grads = _logits_and_grads(chunked, ids, probe, checkpointing)
    assert rel_err(logits, ref_logits) <= 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        assert ref_grad is not None and grads[name] is not None, name
        assert rel_err(grads[name], ref_grad) <= 1e-5, name


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


# ---- recipes/max_seq_len.py ------------------------------------------------------------------------------


def _max_seq_len(*args, launcher=(sys.executable,), env=None):
    return subprocess.run(
        [*launcher, str(REPO / "recipes" / "max_seq_len.py"), *args],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def test_max_seq_len_with_chunked_mlp_on_the_cpu(tmp_path):
    result_file = tmp_path / "result.json"
    result = _max_seq_len("--start", "64", "--max_block_size", "128", "--granularity", "64", "--mlp_chunk_size",
                          "48", "--offload_activations", "--json", str(result_file))
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("longest trainable block_size for tnl-tiny.json") and "chunked MLP (48 tokens)" in last
    record = json.loads(result_file.read_text())
    assert record["longest_block_size"] == 128 and record["mlp_chunk_size"] == 48 and not record["fsdp"]
    assert "activations offloaded to CPU" in record["memory_savers"]


def test_max_seq_len_rejects_bad_memory_flags():
    spec = importlib.util.spec_from_file_location("recipe_max_seq_len_for_savers", REPO / "recipes" / "max_seq_len.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with pytest.raises(ValueError, match="--fsdp"):
        recipe.main(["--fsdp"])
    with pytest.raises(ValueError, match="--mlp_chunk_size"):
        recipe.main(["--mlp_chunk_size", "0"])


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
    """One step as max_seq_len.py takes it under --fsdp: SP = 2, FSDP2 over both ranks, chunked MLP inside the
    layer checkpoints, activations offloaded; the full gradients (averaged over the 2 ranks)."""
    from lasp_hf.parallel import init_sequence_parallel
    from lasp_hf.parallel.sharding import shard_batch_for_sp

    spec = importlib.util.spec_from_file_location("recipe_max_seq_len_fsdp", REPO / "recipes" / "max_seq_len.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    _, model = _pair(BLOCKS[1], chunk_size)
    model.train().activation_checkpointing_enable()
    sharded = recipe.shard_with_fsdp2(model, torch.float32)
    sp = init_sequence_parallel(2)
    batch = shard_batch_for_sp({"input_ids": ids, "labels": ids}, sp)
    with torch.autograd.graph.save_on_cpu():
        loss = sharded(**batch, loss_reduction="sum").loss
    loss.backward()
    return {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}


@pytest.mark.distributed
def test_recipe_fsdp2_with_chunked_mlp_gives_the_unsharded_gradient():
    from distributed_utils import run_distributed

    ids = torch.randint(1, VOCAB, (1, 2 * T + 2))
    grads = run_distributed(_recipe_fsdp2_gradients, 2, ids, 8)[0]
    reference, _ = _pair(BLOCKS[1], 8)
    reference.train()(input_ids=ids, labels=ids, loss_reduction="sum").loss.backward()
    for name, p in reference.named_parameters():
        # FSDP2 averages the two ranks' gradients of their own slices' summed losses: half the full gradient.
        assert rel_err(2 * grads[name], p.grad) <= 1e-4, name
