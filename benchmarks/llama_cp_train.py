"""HF Llama trained with accelerate's context parallelism: the peer of tnl-1b in `long_context.py`.

    torchrun --standalone --nproc_per_node 4 benchmarks/llama_cp_train.py --seq_len 262144 --steps 4 --json out.json
    python benchmarks/llama_cp_train.py --cpu --tiny --seq_len 64 --steps 2     # one CPU process, no CP (smoke test)

An `LlamaForCausalLM` of tnl-1b's size (hidden 2048, 16 layers, 16 heads, intermediate 5632, vocabulary 64000,
SDPA; 0.98B parameters), random weights, trained on one sequence of --seq_len random tokens per step. With W > 1
processes (CUDA): accelerate's `ParallelismConfig(cp_size=W)` with FSDP2 over the same W ranks (parameters,
gradients and AdamW states sharded, bf16 compute, activation checkpointing per decoder layer), and
`accelerator.maybe_context_parallel`, torch's `context_parallel`: each rank holds 2 x W-th chunks of the sequence
(load-balanced for the causal mask) and SDPA runs as ring attention. The loss is lasp_hf's chunked cross-entropy
(`loss_lasp.chunked_cross_entropy`, --loss_chunk_size tokens at a time, the same as tnl-1b's): the `[T, vocab]`
logits never exist. With one process (or --cpu, where torch's context parallelism does not run) the same step runs
without CP or FSDP: the test of this program's plumbing.

Each step is timed on the host after a device synchronize; rank 0 prints one JSON line per step and writes --json:
the steps (seconds, tokens/s, loss, TFLOP/s per GPU counted as 6 x parameters x tokens/s / W, attention not
counted) and the peak memory of every rank (`torch.cuda.max_memory_allocated`; the peak resident set on CPU).
An out-of-memory error ends the run with a non-zero exit (long_context.py records it as OOM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Before torch loads: growable segments keep the allocator from fragmenting at these lengths (as max_seq_len.py).
if __name__ == "__main__" and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NO_MULTICAST_ENV  # noqa: E402,F401  (importing common turns NVLink multicast off)

IGNORE_INDEX = -100


def llama_config(tiny: bool, seq_len: int):
    from transformers import LlamaConfig

    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=128)
             if tiny else
             dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                  vocab_size=64000))
    return LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"],
                       max_position_embeddings=max(seq_len, 8192), attn_implementation="sdpa", use_cache=False,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


class ChunkedLossLlama(torch.nn.Module):
    """`LlamaForCausalLM` whose loss is the chunked cross-entropy of its last hidden states: forward returns
    (summed token losses, number of targets) of the tokens this rank holds. The head is read inside this
    module's forward, so FSDP2's root unit (this module) gathers it like every other root parameter."""

    def __init__(self, llm: torch.nn.Module, loss_chunk_size: int):
        super().__init__()
        self.llm, self.loss_chunk_size = llm, loss_chunk_size

    def forward(self, input_ids, position_ids, shift_labels):
        from lasp_hf.modeling.loss_lasp import chunked_cross_entropy

        hidden = self.llm.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        return chunked_cross_entropy(hidden, self.llm.lm_head.weight, shift_labels, self.loss_chunk_size)


def step_batch(vocab_size: int, T: int, step: int, device) -> list[torch.Tensor]:
    """input_ids, position_ids, shift_labels `[1, T]` (the same on every rank: a seeded CPU generator). Fresh each
    step: context parallelism shards these buffers in place."""
    ids = torch.randint(vocab_size, (1, T), generator=torch.Generator().manual_seed(step))
    shift = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1)
    return [ids.to(device), torch.arange(T)[None].to(device), shift.to(device)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq_len", type=int, required=True, help="tokens per sequence (one sequence per step)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--loss_chunk_size", type=int, default=4096)
    parser.add_argument("--no_checkpointing", action="store_true", help="no activation checkpointing")
    parser.add_argument("--cp_comm_strategy", choices=("allgather", "alltoall"), default="allgather",
                        help="how the ring exchanges keys / values (accelerate's TorchContextParallelConfig)")
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--cpu", action="store_true", help="CPU, one process, no CP (smoke test)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64 Llama (smoke test)")
    parser.add_argument("--dry_run", action="store_true", help="build the model, print its size and the plan, exit")
    parser.add_argument("--json", default=None, help="rank 0 writes the run here")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.seq_len < 2 or args.steps < 1 or args.loss_chunk_size < 1:
        raise ValueError(f"--seq_len ({args.seq_len}) must be >= 2, --steps ({args.steps}) and --loss_chunk_size "
                         f"({args.loss_chunk_size}) >= 1")
    if world > 1 and args.seq_len % (2 * world):
        raise ValueError(f"--seq_len {args.seq_len} must be a multiple of 2 x W = {2 * world}: context parallelism "
                         "gives each rank two equal chunks")
    if world > 1 and args.cpu:
        raise ValueError(f"--cpu runs one process without context parallelism (torch's needs CUDA); got WORLD_SIZE "
                         f"{world}")
    return args, world


def build_accelerator(world: int, cpu: bool, checkpointing: bool, comm: str):
    """W > 1: FSDP2 + context parallelism over all W ranks; else a plain single-process accelerator."""
    from accelerate import Accelerator

    if world == 1:
        return Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16")
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import FullyShardedDataParallelPlugin, TorchContextParallelConfig

    parallelism = ParallelismConfig(dp_shard_size=1, cp_size=world,
                                    cp_handler=TorchContextParallelConfig(cp_comm_strategy=comm))
    fsdp = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                          activation_checkpointing=checkpointing, reshard_after_forward=True,
                                          state_dict_type="SHARDED_STATE_DICT")
    return Accelerator(mixed_precision="bf16", parallelism_config=parallelism, fsdp_plugin=fsdp)


def main(argv=None) -> None:
    args, world = parse_args(argv)
    from transformers import LlamaForCausalLM, set_seed

    from lasp_hf.training.trainer import peak_memory_gb

    set_seed(0)
    config = llama_config(args.tiny, args.seq_len)
    checkpointing = not args.no_checkpointing
    accelerator = None if args.dry_run else build_accelerator(world, args.cpu, checkpointing, args.cp_comm_strategy)
    # Built on its device (float32: FSDP2 keeps float32 shards and computes in bf16); fully_shard then frees all
    # but this rank's shard.
    with torch.device(accelerator.device if accelerator else "cpu"):
        llm = LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in llm.parameters())
    plan = {"system": "llama-cp", "world": world, "cp_size": world, "seq_len": args.seq_len,
            "tokens_per_gpu": args.seq_len // world, "parameters": num_params, "checkpointing": checkpointing,
            "loss_chunk_size": args.loss_chunk_size, "cp_comm_strategy": args.cp_comm_strategy if world > 1 else None}
    if args.dry_run:
        print(json.dumps(plan))
        return
    if world == 1 and checkpointing:  # under FSDP2, accelerate's plugin checkpoints each decoder layer instead
        enable = getattr(llm, "activation_checkpointing_enable", llm.gradient_checkpointing_enable)
        enable()
    model = ChunkedLossLlama(llm, args.loss_chunk_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    device, T = accelerator.device, args.seq_len
    num_targets = T - 1  # the last position has no target
    steps = []
    for step in range(1, args.steps + 1):
        batch = step_batch(config.vocab_size, T, step, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        with accelerator.maybe_context_parallel(buffers=batch, buffer_seq_dims=[1, 1, 1],
                                                no_restore_buffers=set(batch)):
            loss_sum, _ = model(*batch)
            # FSDP averages gradients over the W ranks: x W makes them those of the mean over all targets.
            accelerator.backward(loss_sum * (world / num_targets))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        total = loss_sum.detach().float()
        if world > 1:
            dist.all_reduce(total)
        rate = T / seconds
        steps.append({"step": step, "seconds": seconds, "tokens_per_second": rate, "loss": total.item() / num_targets,
                      "tflops_per_device": 6 * num_params * rate / world / 1e12,
                      "peak_memory_gb": peak_memory_gb(device)})
        if accelerator.is_main_process:
            print(json.dumps(steps[-1]), flush=True)
    peaks = [peak_memory_gb(device)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, peaks[0])
        peaks = gathered
    if accelerator.is_main_process and args.json:
        plan.update(card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    steps=steps, peak_memory_gb=max(peaks), peak_memory_gb_per_rank=peaks)
        Path(args.json).write_text(json.dumps(plan, indent=1) + "\n")
    accelerator.end_training()


if __name__ == "__main__":
    main()
