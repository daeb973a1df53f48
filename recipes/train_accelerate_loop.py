"""Train a lasp causal LM under LASP with a plain accelerate loop: the pieces LaspTrainer assembles, on one page.

    accelerate launch --config_file recipes/accelerate/cpu_sp2.yaml recipes/train_accelerate_loop.py --max_steps 20

What sequence parallelism adds to an ordinary accelerate loop, each marked "SP:" below: the SP degree is read
before the Accelerator exists; the SP process groups are built once after it; the dataloader is sharded over the
data-parallel groups only (the W ranks of an SP group draw the same batch); each batch is cut with
`shard_batch_for_sp` (labels shifted before the cut); the loss is the token-weighted sum over the step's global
token count, scaled so that the gradient average over all ranks is the unsharded gradient (lasp_hf.training.loss).
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import pathlib
import time

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from lasp_hf import LaspConfig, LaspForCausalLM
from lasp_hf.parallel import init_sequence_parallel
from lasp_hf.parallel.sharding import shard_batch_for_sp
from lasp_hf.training import (
    PackedBlockCollator,
    build_clm_datasets,
    global_target_tokens,
    local_target_tokens,
    prepare_dataloader_over_dp,
    resolve_sequence_parallel_size,
    scale_loss,
    with_shift_labels,
)
from lasp_hf.training.trainer import peak_memory_gb
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, set_seed

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default=str(REPO / "recipes" / "configs" / "tnl-tiny.json"))
    parser.add_argument("--train_file", default=str(REPO / "data" / "corpus.jsonl"))
    parser.add_argument("--tokenizer", default=str(REPO / "data" / "tokenizer"))
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=1, help="blocks per micro-batch per DP group")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequence_parallel_size", type=int, default=None, help="overrides the accelerate config")
    parser.add_argument("--sp_mode", default="ring", choices=["ring", "allgather"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--timeout_s", type=int, default=600, help="bound on every collective (dead or hung ranks)")
    parser.add_argument("--log_file", default=None, help="write the per-step losses as JSON here (main process)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sp_size, source = resolve_sequence_parallel_size(args.sequence_parallel_size)  # SP: before the Accelerator
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()  # CPU processes: gloo
    timeout = datetime.timedelta(seconds=args.timeout_s)
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    if accelerator.num_processes % sp_size != 0:
        raise ValueError(f"sequence_parallel_size = {sp_size} (from {source}) must divide the number of processes, "
                         f"got {accelerator.num_processes}")
    sp = None
    dp_rank, dp_size = 0, 1
    if accelerator.num_processes > 1:  # SP: the groups, once, right after the Accelerator
        sp = init_sequence_parallel(sp_size, args.sp_mode, timeout=timeout)
        dp_rank, dp_size = sp.dp_rank, sp.dp_size
    if args.block_size % sp_size != 0:
        raise ValueError(f"--block_size={args.block_size} is not divisible by the sequence-parallel size {sp_size}")
    set_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with accelerator.main_process_first():
        train, _ = build_clm_datasets(tokenizer, args.block_size, train_file=args.train_file,
                                      max_train_samples=args.max_train_samples)
    model = LaspForCausalLM(LaspConfig.from_json_file(args.model_config))
    if args.gradient_checkpointing:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    # A seeded shuffle: the order does not depend on the number of processes, so runs compare step by step.
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=PackedBlockCollator(),
                        generator=torch.Generator().manual_seed(args.seed))
    loader = prepare_dataloader_over_dp(accelerator, loader, dp_rank, dp_size)  # SP: shard over DP groups only

    def cut(batch):  # SP: this rank's slice, labels shifted on the full sequence first
        return shard_batch_for_sp(batch, sp) if sp is not None else with_shift_labels(batch)

    def forever(loader):
        for epoch in range(10**9):
            loader.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
            yield from loader

    batches = forever(loader)
    losses, tokens_seen, start = [], 0, time.perf_counter()
    model.train()
    for step in range(1, args.max_steps + 1):
        micro = [cut(next(batches)) for _ in range(args.gradient_accumulation_steps)]
        # SP: the step's target tokens over all ranks; each rank's loss is P * S_p / N (lasp_hf.training.loss).
        num_tokens = global_target_tokens(local_target_tokens(micro, accelerator.device), sp)
        step_loss = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss = scale_loss(model(**batch, loss_reduction="sum").loss, num_tokens, accelerator.num_processes)
                accelerator.backward(loss)
            step_loss += loss.detach()
            tokens_seen += batch["input_ids"].numel() * accelerator.num_processes
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        global_loss = accelerator.reduce(step_loss, reduction="mean").item()  # = the unsharded loss
        losses.append(global_loss)
        elapsed = time.perf_counter() - start
        accelerator.print(f"step {step}: loss {global_loss:.4f}  tokens/s {tokens_seen / elapsed:.0f}  "
                          f"peak memory {peak_memory_gb(accelerator.device):.2f} GB")
    # Let every rank's gloo threads retire their last collectives before the process groups are torn down
    # (a completed all-reduce still releasing its Python tensors can otherwise deadlock the exit).
    accelerator.wait_for_everyone()
    if args.log_file and accelerator.is_main_process:
        pathlib.Path(args.log_file).write_text(json.dumps({"losses": losses, "sequence_parallel_size": sp_size}))
    # Drop the DDP wrapper (its reducer holds the data-parallel group) while every rank is still here, so the groups
    # are torn down by end_training in order rather than by the interpreter's exit, where gloo's destructor can hang.
    del model, optimizer
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
