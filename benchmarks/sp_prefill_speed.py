"""Time to first token of a long prompt: sequence-parallel prefill over W GPUs (`lasp_hf.parallel.sp_prefill`),
then decoding on rank 0, against one GPU's chunked prefill of the same prompt.

    torchrun --standalone --nproc_per_node 4 benchmarks/sp_prefill_speed.py --length 1M
    torchrun --standalone --nproc_per_node 2 benchmarks/sp_prefill_speed.py --cpu --tiny     # gloo smoke test

Model: tnl-1b (or --model hybrid-1b), random weights, bf16 on a GPU (float32 on CPU), built as in
generate_speed.py. Rows, one prompt of --length random tokens (B = 1):
- `single`: rank 0 alone runs `model(prompt, use_cache=True)`, which prefills in chunks of
  `config.prompt_chunk_size` (the other ranks wait);
- `sp-ring`, `sp-allgather`: every rank prefills its T / W slice and the states are combined (LASP ring or
  all-gather); the time is the slowest rank's. Rank 0 then decodes from its cache.
`ttft ms` is the prefill's time (its last logits give the first token), after one untimed prefill of a
16K x W-token prompt on each path (kernels compile); `decode ms/tok` is --decode-steps eager greedy steps on rank 0 from the prefilled cache;
`peak GiB` the highest per-rank peak. Each SP row is checked against `single` on rank 0: the relative error of the
prompt's last logits and of the next step's logits from the cache (bf16: <= 1e-2, the project's bf16 bound;
float32: <= 1e-4); a row that fails is FAILED and gets no speedup. Writes `sp-prefill-<card>-W<W>.json` (+ .md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, Column, card_slug, environment, format_table, relative_error, write_results  # noqa
from generate_speed import OURS, _cache_of, _lengths, _timed_ms, build_model, eager_steps  # noqa: E402

MODES = ("ring", "allgather")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=OURS, default="tnl-1b")
    parser.add_argument("--length", default="1M", help="prompt tokens: 1048576, 1M, 256K")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU (smoke test)")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer stand-in model, a 130-token prompt")
    parser.add_argument("--timeout-s", type=int, default=600, help="process-group timeout")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    args.length = 130 if args.tiny and args.length == "1M" else _lengths([args.length])[0]
    if args.decode_steps < 1:
        raise ValueError(f"--decode-steps must be at least 1, got {args.decode_steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    from lasp_hf.parallel import init_sequence_parallel, sp_prefill

    rank, W = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    contexts = {mode: init_sequence_parallel(W, mode=mode) for mode in args.modes}
    model = build_model(args.model, device, dtype, args.tiny)
    vocab, T = model.config.vocab_size, args.length
    gen = torch.Generator().manual_seed(0)
    prompt, nxt = torch.randint(3, vocab, (1, T), generator=gen), torch.randint(3, vocab, (1, 1), generator=gen)
    prompt, nxt = prompt.to(device), nxt.to(device)

    def reset_peak():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    def slowest(ms: float) -> float:
        box = torch.tensor([ms], dtype=torch.float64, device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return float(box.item())

    def decode_ms(cache, logits) -> float:
        token = logits.argmax(dim=-1, keepdim=True)
        return _timed_ms(lambda: eager_steps(model, cache, token, args.decode_steps), device) / args.decode_steps

    rows = []
    with torch.no_grad():
        warm = prompt[:, : min(T, (16384 if cuda else 64) * W)]  # full-size chunks: kernels compile, autotune
        for ctx in contexts.values():
            sp_prefill(model, warm, ctx)
        if rank == 0:
            model(warm, use_cache=True, logits_to_keep=1)
        dist.barrier()

        single = {"provider": "single", "T": T, "world": 1}
        if rank == 0:
            reset_peak()
            box = {}
            single["ttft_ms"] = _timed_ms(lambda: box.update(out=model(prompt, use_cache=True, logits_to_keep=1)),
                                          device)
            single["peak_gb"] = peak_gb()
            ref_cache, ref_logits = _cache_of(box["out"]), box["out"].logits[:, -1]
            ref_next = model(nxt, past_key_values=ref_cache, use_cache=True).logits[:, -1]
            single["decode_ms_per_token"] = decode_ms(ref_cache, ref_next)
            single["status"] = "ok"
            del ref_cache, box
        rows.append(single)
        dist.barrier()

        for mode, ctx in contexts.items():
            row = {"provider": f"sp-{mode}", "T": T, "world": W}
            reset_peak()
            result = {}
            dist.barrier()
            ms = _timed_ms(lambda: result.update(zip(("logits", "cache"), sp_prefill(model, prompt, ctx))), device)
            row["ttft_ms"] = slowest(ms)
            peak = torch.tensor([peak_gb() or 0.0], device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            row["peak_gb"] = float(peak.item()) if cuda else None
            if rank == 0:
                step = model(nxt, past_key_values=result["cache"], use_cache=True).logits[:, -1]
                row["err"] = max(relative_error(result["logits"], ref_logits), relative_error(step, ref_next))
                row["decode_ms_per_token"] = decode_ms(result["cache"], step)
                row["status"] = "ok" if row["err"] <= tolerance else "FAILED"
                if row["status"] == "ok":
                    row["speedup"] = single["ttft_ms"] / row["ttft_ms"]
            result.clear()  # (the other ranks' caches go: rank 0 alone decodes)
            rows.append(row)
            dist.barrier()

    if rank == 0:
        for row in rows:
            row["tokens_per_s"] = T / (row["ttft_ms"] / 1e3)
        env = environment(device)
        columns = [Column("provider", "prefill"), Column("world", "GPUs"), Column("T", "prompt tokens", "{:,}"),
                   Column("ttft_ms", "ttft ms", "{:.1f}"), Column("tokens_per_s", "prefill tok/s", "{:,.0f}"),
                   Column("speedup", "vs single", "{:.2f}x"), Column("decode_ms_per_token", "decode ms/tok", "{:.3f}"),
                   Column("peak_gb", "peak GiB", "{:.1f}"), Column("err", "rel err", "{:.1e}"),
                   Column("status", "status")]
        name = f"sp-prefill-{card_slug(env['card'])}-W{W}" + ("-tiny" if args.tiny else "")
        path = write_results(name, env, rows, columns, args.out, extra={"args": vars(args), "tolerance": tolerance},
                             notes=[f"command: `{' '.join(sys.argv)}`", f"model {args.model}, {dtype}",
                                    f"check: rel err <= {tolerance} against the single-GPU prefill"])
        print(format_table(rows, columns) + f"\nwrote {path}", flush=True)
    failed = any(r.get("status") == "FAILED" for r in rows)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
