"""Find the longest --block_size that one training step fits in, for a model config on the visible devices.

    python recipes/max_seq_len.py --model_config recipes/configs/tnl-1b.json                       # 1 GPU
    accelerate launch --config_file recipes/accelerate/ddp_sp4.yaml recipes/max_seq_len.py \\
        --model_config recipes/configs/tnl-1b.json                                                  # SP = 4

Each candidate runs one full training step (forward, backward, AdamW step) on one packed sequence of random tokens,
with the memory savers chosen by flags (activation checkpointing on by default, chunked cross-entropy always,
`--offload_activations`, `--mlp_chunk_size`, `--attention_chunk_size`, `--fsdp`). The block size doubles from
--start until a step runs out of memory or reaches --max_block_size, then bisects between the last size that fit and
the first that did not, to --granularity. Under SP the W ranks hold T / W tokens each and agree on every verdict. The
last line printed is the answer, with the memory savers in use.

    accelerate launch --config_file recipes/accelerate/fsdp2_sp4.yaml recipes/max_seq_len.py \
        --model_config recipes/configs/tnl-1b.json --offload_activations --mlp_chunk_size 16384 \
        --attention_chunk_size 16384                                                                # FSDP2, SP = 4

Under an accelerate FSDP config (or with --fsdp) the model is sharded with torch's FSDP2 (`fully_shard` per decoder
layer and at the root, bf16 compute copies under bf16): parameters, gradients and AdamW states are split over the
ranks instead of replicated as under DDP. Run as a script, it sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
unless PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF is set already: growable segments keep the allocator from
fragmenting when tensors of many sizes come and go at these lengths (pass expandable_segments:False to compare).

With --memory_report PATH (CUDA), rank 0 records its allocations during each trial and writes PATH.T<size>.txt:
the blocks alive at the trial's highest point (or its out-of-memory), summed by allocation site (file:line
function) and by block size, largest first. It is for finding where memory goes, not for the verdict: on torch 2.11
recording stacks inside the checkpoint's recompute has killed a step with SystemError on the recording rank.

An OOM on one rank while the others wait in a collective cannot always be recovered; the others then stop after
--timeout_s, and the sizes printed so far stand.
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import pathlib
import time

# Before torch is imported, as the CUDA allocator may read its settings once, when it loads.
if __name__ == "__main__" and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.distributed as dist
from lasp_hf import LaspConfig, LaspForCausalLM
from lasp_hf.parallel import init_sequence_parallel
from lasp_hf.parallel.sharding import shard_batch_for_sp
from lasp_hf.training import resolve_sequence_parallel_size
from lasp_hf.training.trainer import peak_memory_gb

REPO = pathlib.Path(__file__).resolve().parents[1]


def find_longest(fits, start: int, cap: int, granularity: int) -> int | None:
    """The largest multiple of `granularity` in [start, cap] for which `fits(T)` holds, assuming fits is
    monotone (True up to some length, False beyond); None when even `start` does not fit."""
    if start % granularity or cap < start:
        raise ValueError(f"need start ({start}) a multiple of granularity ({granularity}) and cap ({cap}) >= start")
    top = cap - cap % granularity
    good, size = None, start
    while True:  # doubling
        if not fits(size):
            bad = size
            break
        good = size
        if size >= top:
            return size
        size = min(2 * size, top)
    if good is None:
        return None
    while bad - good > granularity:  # bisection
        mid = (good + bad) // 2 // granularity * granularity
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def shard_with_fsdp2(model, dtype):
    """FSDP2 over all processes: one `fully_shard` unit per decoder layer (its parameters are gathered only while it
    runs, forward or backward) and one at the root for the embeddings, final norm and head. Under bf16 the layers
    compute with bf16 copies of the parameters; gradients are reduced in float32 into float32 shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _site(frames) -> str:
    """The innermost Python frame outside torch / triton of an allocation's stack (C++ frames come first)."""
    python = [f for f in frames or [] if f.get("filename", "").endswith(".py")]
    site = next((f for f in python if not any(part in f["filename"] for part in ("/torch/", "/triton/"))), None)
    return f"{site['filename']}:{site['line']} {site['name']}" if site else "(no Python frame recorded)"


def _tables(blocks, top: int) -> list[str]:
    """Blocks (size, frames) summed by allocation site, then by block size (the autograd engine's blocks have no
    Python frame; their sizes say which tensors they are)."""
    sites: dict[str, list[int]] = {}
    sizes: dict[int, int] = {}
    for size, frames in blocks:
        entry = sites.setdefault(_site(frames), [0, 0, 0])
        entry[0] += size
        entry[1] += 1
        entry[2] = max(entry[2], size)
        sizes[size] = sizes.get(size, 0) + 1
    gib = 2**30
    lines = ["GiB      blocks  largest MiB  allocation site"]
    for key, (size, count, largest) in sorted(sites.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"{size / gib:7.3f}  {count:6d}  {largest / 2**20:11.1f}  {key}")
    lines += ["", "GiB      blocks  block MiB  (blocks by size)"]
    for size, count in sorted(sizes.items(), key=lambda item: -item[0] * item[1])[:top]:
        lines.append(f"{size * count / gib:7.3f}  {count:6d}  {size / 2**20:9.1f}")
    return lines


def summarize_peak(trace: list[dict], held_before: int, top: int = 30) -> str:
    """The blocks alive at the highest point of an allocator trace (one device's `device_traces` of a
    snapshot, recorded from the start of a training step), by allocation site and by size. `held_before`:
    bytes allocated when recording began (parameters, optimizer states), whose frees appear without an alloc."""
    current = peak = held_before
    peak_index = -1
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            current += event["size"]
        elif event["action"] == "free_completed":
            current -= event["size"]
        if current > peak:
            peak, peak_index = current, index
    live, freed_early = {}, 0
    for event in trace[:peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames"))
        elif event["action"] == "free_completed":
            if live.pop(event["addr"], None) is None:
                freed_early += event["size"]
    ooms = [event for event in trace if event["action"] == "oom"]
    gib = 2**30
    head = [f"peak {peak / gib:.2f} GiB allocated (trace event {peak_index + 1} of {len(trace)}): "
            f"{(held_before - freed_early) / gib:.2f} GiB held from before the step, "
            f"{sum(size for size, _ in live.values()) / gib:.2f} GiB allocated in it"]
    if ooms:
        head.append(f"out of memory asking for {ooms[0]['size'] / 2**20:.1f} MiB "
                    f"({ooms[0].get('device_free', 0) / 2**20:.1f} MiB free on the device)")
    return "\n".join(head + [""] + _tables(live.values(), top)) + "\n"


def allocator_settings() -> str | None:
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")


def memory_savers(args, config, fsdp: bool, world: int, cuda: bool) -> list[str]:
    """The memory savers of this run, in words, for the result line and the JSON."""
    savers = [] if args.no_gradient_checkpointing else ["activation checkpointing per layer"]
    if args.model_dtype != "float32":
        savers.append(f"{args.model_dtype} parameters, gradients and AdamW states")
    if args.offload_activations:
        savers.append("activations offloaded to CPU")
    savers.append(f"chunked cross-entropy ({config.loss_chunk_size} tokens)")
    if config.mlp_chunk_size is not None:
        savers.append(f"chunked MLP ({config.mlp_chunk_size} tokens)")
    if config.attention_chunk_size is not None:
        savers.append(f"chunked attention projections ({config.attention_chunk_size} tokens)")
    if fsdp:
        savers.append(f"FSDP2 (parameters, gradients, optimizer states / {world})")
    if cuda and allocator_settings():
        savers.append(f"allocator {allocator_settings()}")
    return savers


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default=str(REPO / "recipes" / "configs" / "tnl-tiny.json"))
    parser.add_argument("--start", type=int, default=None, help="first block size (default 8192 x W, or granularity)")
    parser.add_argument("--max_block_size", type=int, default=2**24, help="stop doubling here")
    parser.add_argument("--granularity", type=int, default=None, help="answer's resolution (default 1024 x W)")
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument("--offload_activations", action="store_true", help="torch.autograd.graph.save_on_cpu")
    parser.add_argument("--mlp_chunk_size", type=int, default=None,
                        help="run each block's norm + GLU over this many tokens at a time (config.mlp_chunk_size)")
    parser.add_argument("--attention_chunk_size", type=int, default=None,
                        help="run the token-wise parts of each linear-attention block (norm, projections, feature "
                             "maps; output norm, gate, o_proj) over this many tokens at a time "
                             "(config.attention_chunk_size)")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard parameters, gradients and optimizer states with FSDP2 (on by itself under an "
                             "accelerate FSDP config)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="autocast dtype (default bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--model_dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the parameters, hence of gradients and AdamW states (train_clm.py's "
                             "--model_dtype): float32 = mixed precision, bfloat16 = everything in bf16")
    parser.add_argument("--sequence_parallel_size", type=int, default=None, help="overrides the accelerate config")
    parser.add_argument("--sp_mode", default="ring", choices=["ring", "allgather"])
    parser.add_argument("--timeout_s", type=int, default=600)
    parser.add_argument("--json", default=None, help="also write the result (and every trial) to this file")
    parser.add_argument("--memory_report", default=None,
                        help="CUDA: rank 0 records allocations during each trial and writes what was alive at its "
                             "peak (by allocation site and block size) to <this path>.T<block_size>.txt")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sp_size, _ = resolve_sequence_parallel_size(args.sequence_parallel_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    sp = None
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
        sp = init_sequence_parallel(sp_size, args.sp_mode, timeout=datetime.timedelta(seconds=args.timeout_s))
    elif sp_size != 1:
        raise ValueError(f"sequence_parallel_size = {sp_size} needs {sp_size} processes; launch with accelerate launch")
    granularity = args.granularity or 1024 * sp_size
    start = args.start or max(granularity, 8192 * sp_size // granularity * granularity)
    if granularity % sp_size:
        raise ValueError(f"--granularity {granularity} must be a multiple of the SP size {sp_size}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    fsdp = args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if fsdp and world == 1:
        raise ValueError("--fsdp (or an accelerate FSDP config) shards over processes: launch with accelerate "
                         "launch or torchrun and more than 1 process, got WORLD_SIZE 1")

    config = LaspConfig.from_json_file(args.model_config)
    if args.mlp_chunk_size is not None:
        if args.mlp_chunk_size < 1:
            raise ValueError(f"--mlp_chunk_size must be a positive number of tokens, got {args.mlp_chunk_size}")
        config.mlp_chunk_size = args.mlp_chunk_size
    if args.attention_chunk_size is not None:
        if args.attention_chunk_size < 1:
            raise ValueError("--attention_chunk_size must be a positive number of tokens, got "
                             f"{args.attention_chunk_size}")
        config.attention_chunk_size = args.attention_chunk_size
    torch.manual_seed(0)
    model = LaspForCausalLM(config).to(device, getattr(torch, args.model_dtype))
    if not args.no_gradient_checkpointing:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    if fsdp:
        trained = shard_with_fsdp2(model, dtype)
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    savers = memory_savers(args, config, fsdp, world, cuda)
    trials = []
    if args.memory_report and not cuda:
        raise ValueError("--memory_report records CUDA allocations; this run has no GPU")
    report = args.memory_report and rank0
    held_before = 0

    def train_step(T: int) -> None:
        ids = torch.randint(config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
        batch = {"input_ids": ids, "labels": ids}
        batch = shard_batch_for_sp(batch, sp) if sp is not None and sp.world_size > 1 else batch
        offload = torch.autograd.graph.save_on_cpu(pin_memory=cuda) if args.offload_activations else None
        with offload or contextlib.nullcontext(), torch.autocast(device.type, dtype=dtype,
                                                                  enabled=dtype != torch.float32):
            loss = trained(**batch, loss_reduction="sum").loss
        loss.backward()
        optimizer.step()

    def write_report(T: int, verdict: str) -> None:
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        torch.cuda.memory._record_memory_history(enabled=None)
        pathlib.Path(f"{args.memory_report}.T{T}.txt").write_text(
            f"block_size {T}, {T // sp_size} tokens per rank, rank 0, {verdict}\n"
            + summarize_peak(trace, held_before))

    # A small step first: kernels compile and NCCL connects (FSDP's collectives allocate their buffers at first
    # use, outside PyTorch's allocator) before the first long trial fills the GPU.
    train_step(8192 * sp_size)
    optimizer.zero_grad(set_to_none=True)

    def fits(T: int) -> bool:
        nonlocal held_before
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        began, ok = time.perf_counter(), True
        if report:  # Python stacks only: unwinding C++ stacks in autograd's thread broke an OOM (torch 2.11)
            held_before = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        try:
            train_step(T)
        except torch.OutOfMemoryError:
            ok = False
        except BaseException as error:  # e.g. NCCL out of memory: report what held the memory, then fail
            if report:
                write_report(T, f"failed: {type(error).__name__}")
            raise
        if report:
            write_report(T, "fits" if ok else "out of memory")
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        verdict = torch.tensor(int(ok), device=device)
        if dist.is_initialized():
            dist.all_reduce(verdict, op=dist.ReduceOp.MIN)  # fits only if it fits on every rank
        ok = bool(verdict.item())
        peak = peak_memory_gb(device)  # CUDA: allocated since the reset; CPU: the process's peak resident set
        trials.append({"block_size": T, "fits": ok, "seconds": time.perf_counter() - began, "peak_gb": peak})
        if rank0:
            print(f"block_size {T:>10}: {'fits' if ok else 'out of memory'}  (peak {peak:.2f} GB on rank 0, "
                  f"{T // sp_size} tokens per rank)", flush=True)
        return ok

    longest = find_longest(fits, start, args.max_block_size, granularity)
    capped = longest is not None and longest >= args.max_block_size - args.max_block_size % granularity
    if rank0:
        where = f"{world} process(es), SP size {sp_size}, {device.type}"
        note = " (the --max_block_size cap; more may fit)" if capped else ""
        print(f"longest trainable block_size for {pathlib.Path(args.model_config).name} on {where}: {longest}{note}"
              f"; memory savers: {', '.join(savers)}")
        if args.json:
            result = {"model_config": args.model_config, "world_size": world, "sequence_parallel_size": sp_size,
                      "device": device.type, "longest_block_size": longest, "capped": capped, "trials": trials,
                      "gradient_checkpointing": not args.no_gradient_checkpointing,
                      "offload_activations": args.offload_activations, "dtype": str(dtype),
                      "loss_chunk_size": config.loss_chunk_size, "mlp_chunk_size": config.mlp_chunk_size,
                      "attention_chunk_size": config.attention_chunk_size,
                      "fsdp": fsdp, "cuda_alloc_conf": allocator_settings() if cuda else None,
                      "memory_savers": savers}
            pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
