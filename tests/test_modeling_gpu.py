"""The lasp model family on a CUDA GPU (Triton kernels through `linear_attention`'s "auto" backend)
against the same model on CPU (PyTorch reference), and a training step of a real-size preset.
Run with `pytest -m gpu`."""

import copy
import pathlib

import pytest
import torch
from lasp_hf import LaspConfig, LaspForCausalLM
from test_modeling_common import CASE_IDS, CASES, VOCAB, rel_err, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "configs"


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_cuda_matches_cpu(mixer, layer_types):
    cpu = tiny_model(mixer, layer_types).train()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randint(1, VOCAB, (2, 200))
    ref = cpu(x, labels=x, logits_to_keep=200)
    ref.loss.backward()
    out = gpu(x.cuda(), labels=x.cuda(), logits_to_keep=200)
    out.loss.backward()
    # float32 end to end; Triton's dot products may still round through TF32 inside the kernels.
    assert rel_err(out.logits.cpu(), ref.logits) < 1e-3
    assert rel_err(out.loss.cpu(), ref.loss) < 1e-4
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        assert rel_err(p_gpu.grad.cpu(), p_cpu.grad) < 1e-3, name

    bf16 = copy.deepcopy(cpu).cuda().to(torch.bfloat16).eval()
    reference = copy.deepcopy(bf16).float().cpu().eval()
    assert rel_err(bf16(x.cuda()).logits.float().cpu(), reference(x).logits) < 2e-2


@pytest.mark.parametrize("mixer, layer_types", CASES, ids=CASE_IDS)
def test_cuda_cached_generate_equals_uncached(mixer, layer_types):
    model = tiny_model(mixer, layer_types).cuda()
    x = torch.randint(1, VOCAB, (2, 9), device="cuda")
    cached = model.generate(x, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = model.generate(x, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("preset", ["tnl-1b", "hybrid-1b", "gla-340m"])
def test_real_size_training_steps_bf16(preset):
    config = LaspConfig.from_json_file(CONFIGS / f"{preset}.json")
    torch.manual_seed(0)
    model = LaspForCausalLM(config).to("cuda", torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (1, 8192), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the same batch three times: the loss must go down
    # Chunked CE: the [8192, vocab_size] float32 logits (2 GB at 64000, 4 GB with their gradient) are never held.
    params_and_adam_gb = sum(p.numel() for p in model.parameters()) * (2 + 2 + 8) / 2**30
    assert torch.cuda.max_memory_allocated() / 2**30 < params_and_adam_gb + 6
