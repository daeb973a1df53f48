"""Long-context inference: prefill tokens/s and decode ms/token of lasp models against HF Llama and fla RetNet
of the same size, in one process on one card.

    python3 benchmarks/generate_speed.py                                   # every case (see --help)
    python3 benchmarks/generate_speed.py --models tnl-1b llama-1b --lengths 8K 32K
    python3 benchmarks/generate_speed.py --cases "tnl-1b-*"                # glob over case names
    python3 benchmarks/generate_speed.py --cpu --tiny                      # smoke test of the harness

Models (random weights, bf16 on a GPU): tnl-1b and hybrid-1b (recipes/configs/), an HF LlamaForCausalLM of the
same shape (hidden 2048, 16 layers, 16 heads, intermediate 5632, vocab 64000, SDPA) and fla's RetNet (hidden
2048, 16 layers, vocab 64000; 1.1B parameters, as fla's RetNet 1.15B training anchor).

Rows, per model and context length T:
- `prefill` (B = 1): one forward over T prompt tokens with the model's own cache, the last position's logits;
  tokens/s and peak memory (`torch.cuda.max_memory_allocated`, weights included). Ours prefill in chunks of
  `config.prompt_chunk_size`. Every length runs twice and reports the second run (kernels compile and
  autotune in the first, whose time is kept as `first_ms`). hybrid-1b prefills up to --hybrid-max-prefill
  (128K: its softmax layers are quadratic, 1M would take minutes); its decode rows beyond that start from
  random keys / values of T tokens.
- `decode-graph` (ours): ms per token of the CUDA-graph step (`generate(..., cache_implementation="static")`'s
  decoder), timed over --decode-steps replays after a warm-up; `decode-eager`: the same number of eager
  `model(next_token, past_key_values=cache)` steps with an argmax between them (what `generate` runs per
  token, without its bookkeeping). At B = 1 the context is the prefill's own cache; at B > 1 it is made of
  random values of the right shapes (states; keys / values of T tokens): the time of a step does not depend on
  the values. fla RetNet's B > 1 state comes from a 16-token prefill (its size does not depend on T).
- `generate-eager` / `generate-static` (ours, B = 1, the smallest T): `model.generate` as a user calls it,
  today's default and the CUDA-graph path; ms/token = the time difference of two calls with 8 and 8 +
  --generate-steps new tokens, divided by the difference in tokens (the prefill cancels).
- `llama-1b-generate-compiled` (B = 1, 32K): transformers' own fastest decoding, `generate(...,
  cache_implementation="static")` with its automatic `torch.compile`, the same difference of two calls (both
  with the same static cache size; a stopping criterion ends the shorter one).
A row whose memory cannot fit (Llama's or a hybrid's key/value cache larger than the card) is recorded as OOM
without running; an out-of-memory error while running is recorded as OOM too.

Before any decode timing of a model, the graph's greedy tokens are checked against eager decoding from the
same cache (the first --check-steps tokens at the smallest T, B = 1): rows of a model that fails are marked
and no speedup is reported for them.

Output: a table, `benchmarks/results/generate-<card>.json` + `.md`, and `generate-<card>.png` (decode ms/token
at B = 1 against context length; needs matplotlib). The JSON and .md are rewritten after every row (a run
stopped part-way keeps what it measured, noted "partial: n of N cases").
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    KI,
    cuda_kernel_times,
    parse_length,
    REPO_ROOT,
    RESULTS_DIR,
    Column,
    Registry,
    card_slug,
    common_parser,
    describe_env,
    environment,
    format_table,
    short_number,
    write_results,
)

OURS = ("tnl-1b", "hybrid-1b")


def print_table(title: str, rows, columns) -> None:
    print(f"\n{title}")
    print(format_table(rows, columns), flush=True)

PEERS = ("llama-1b", "retnet-1b")
LENGTHS = (4 * KI, 8 * KI, 32 * KI, 128 * KI, 1024 * KI)
TINY_LENGTHS = (64, 256)
BATCH_SIZES = (1, 32)
COMPILED_LENGTH = 32 * KI
GB = 1e9


class Skip(Exception):
    """A case that cannot run here (a peer that does not import, a path that needs CUDA); the message says
    why."""


# ----------------------------------------------------------------------------- models


def _our_config(name: str, tiny: bool):
    from lasp_hf import LaspConfig

    config = LaspConfig.from_json_file(str(REPO_ROOT / "recipes" / "configs" / f"{name}.json"))
    if tiny:
        hybrid = "full_attention" in config.layer_types
        config = LaspConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            token_mixer=config.token_mixer,
            output_gate_act=config.output_gate_act,
            layer_types=["linear_attention", "full_attention"] if hybrid else None,
            prompt_chunk_size=64,
        )
    return config


def build_model(name: str, device: torch.device, dtype: torch.dtype, tiny: bool):
    """A randomly initialized model of the named kind on `device` in `dtype`, in eval mode."""
    torch.manual_seed(0)
    if name in OURS:
        from lasp_hf import LaspForCausalLM

        config = _our_config(name, tiny)
        with torch.device(device):
            model = LaspForCausalLM(config)
    elif name == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = (
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                vocab_size=128,
            )
            if tiny
            else dict(
                hidden_size=2048,
                intermediate_size=5632,
                num_hidden_layers=16,
                num_attention_heads=16,
                vocab_size=64000,
            )
        )
        config = LlamaConfig(
            **shape,
            num_key_value_heads=shape["num_attention_heads"],
            max_position_embeddings=2 * 1024 * KI,
            attn_implementation="sdpa",
            bos_token_id=1,
            eos_token_id=2,
        )
        with torch.device(device):
            model = LlamaForCausalLM(config)
    elif name == "retnet-1b":
        if device.type != "cuda":
            raise Skip("fla's RetNet runs Triton kernels: needs CUDA")
        try:
            from fla.models import RetNetConfig, RetNetForCausalLM
        except Exception as err:  # any import failure of the peer skips it, with the reason
            raise Skip(f"fla does not import: {type(err).__name__}: {err}") from err
        config = RetNetConfig(
            hidden_size=2048, num_hidden_layers=16, vocab_size=64000, fuse_cross_entropy=False
        )
        with torch.device(device):
            model = RetNetForCausalLM(config)
    else:
        raise ValueError(f"unknown model {name!r}; the models are {OURS + PEERS}")
    return model.to(dtype).eval()


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- caches and steps


def _cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


def kv_bytes(model, B: int, T: int) -> int:
    """Bytes of the key/value cache of T tokens (0 for a model without softmax layers)."""
    config = model.config
    if getattr(config, "model_type", "") == "llama":
        layers, heads, dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    elif getattr(config, "model_type", "") == "lasp":
        layers = config.layer_types.count("full_attention")
        heads, dim = config.num_attention_heads, config.head_dim
    else:
        return 0
    return 2 * layers * B * heads * T * dim * next(model.parameters()).element_size()


def synthetic_cache(name: str, model, B: int, T: int):
    """A cache of B rows and T tokens filled with random values (decode timing does not depend on them)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    config = model.config
    if name in OURS:
        from lasp_hf.modeling.cache_lasp import LaspCache

        cache = LaspCache(config)
        H, D = config.num_attention_heads, config.head_dim
        for i, layer_type in enumerate(config.layer_types):
            if layer_type == "linear_attention":
                cache.set_state(torch.empty(B, H, D, D, device=device).normal_(std=0.02), i)
            else:
                keys = torch.empty(B, H, T, D, device=device, dtype=dtype).normal_()
                cache.update(keys, torch.empty_like(keys).normal_(), i)
        cache.num_seen_tokens = T
        return cache
    if name == "llama-1b":
        from transformers import DynamicCache

        cache = DynamicCache()
        shape = (B, config.num_key_value_heads, T, config.head_dim)
        for i in range(config.num_hidden_layers):
            keys = torch.empty(shape, device=device, dtype=dtype).normal_()
            cache.update(keys, torch.empty_like(keys).normal_(), i)
        return cache
    # Recurrent peer: the state's size does not depend on T; a short prefill makes one of the right shape.
    ids = torch.randint(3, config.vocab_size, (B, 16), device=device)
    return _cache_of(model(ids, use_cache=True, logits_to_keep=1))


def eager_steps(model, cache, token: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy one-token steps through the model's forward; returns the tokens `[B, n]`."""
    out = []
    for _ in range(n):
        logits = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn, device) -> float:
    """Milliseconds of one call of fn (CUDA events on a GPU, the host clock elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


# ----------------------------------------------------------------------------- the runner


class Runner:
    """Holds one model at a time and the prefilled context of the last prefill row."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        tiny: bool,
        decode_steps: int,
        generate_steps: int,
        check_steps: int,
        hybrid_max_prefill: int,
    ):
        self.device, self.dtype, self.tiny = device, dtype, tiny
        self.hybrid_max_prefill = hybrid_max_prefill
        self.decode_steps, self.generate_steps, self.check_steps = decode_steps, generate_steps, check_steps
        self.name, self.model, self.context = None, None, None
        self.checks: dict = {}  # model name -> "ok" / "mismatch ..." of the graph-vs-eager token check
        self.profile_graph = False  # --profile-graph: the decode-graph rows also record their kernels

    def free(self):
        self.context = None
        if self.model is not None and hasattr(self.model, "_lasp_graph_decoder"):
            self.model._lasp_graph_decoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def get_model(self, name: str):
        if self.name != name:
            self.name, self.model = None, None
            self.free()
            self.model = build_model(name, self.device, self.dtype, self.tiny)
            if hasattr(self.model, "fuse_projections"):
                self.model.fuse_projections()  # as our generate does first, whatever row runs first
            self.name = name
        return self.model

    def memory_limit(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.get_device_properties(self.device).total_memory

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GB if self.device.type == "cuda" else None

    def ids(self, B: int, T: int, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randint(3, self.model.config.vocab_size, (B, T), generator=gen).to(self.device)

    def check_fits(self, B: int, T: int, copies: int = 1):
        limit = self.memory_limit()
        need = copies * kv_bytes(self.model, B, T)
        if limit is not None and need > 0.9 * limit:
            raise torch.OutOfMemoryError(f"the key/value cache alone needs {need / GB:.0f} GB")

    def prefilled(self, name: str, T: int):
        """(cache, last logits) of a B = 1 prompt of T tokens: the last prefill row's, or a fresh one."""
        if self.context is not None and self.context[0] == (name, T):
            return self.context[1], self.context[2]
        self.context = None
        gc.collect()
        model = self.get_model(name)
        self.check_fits(1, T)
        if name == "hybrid-1b" and T > self.hybrid_max_prefill:
            cache = synthetic_cache(name, model, 1, T)
            self.context = ((name, T), cache, torch.zeros(1, model.config.vocab_size, device=self.device))
            return self.context[1], self.context[2]
        out = model(self.ids(1, T), use_cache=True, logits_to_keep=1)
        self.context = ((name, T), _cache_of(out), out.logits[:, -1])
        return self.context[1], self.context[2]


# ----------------------------------------------------------------------------- cases


def case_prefill(run: Runner, name: str, B: int, T: int) -> dict:
    if name == "hybrid-1b" and T > run.hybrid_max_prefill:
        raise Skip(f"beyond --hybrid-max-prefill {short_number(run.hybrid_max_prefill)}")
    model = run.get_model(name)
    run.context = None
    gc.collect()
    run.check_fits(B, T)
    ids = run.ids(B, T)
    out_box = {}

    def once():
        out_box["out"] = model(ids, use_cache=True, logits_to_keep=1)

    # A first run at the same length compiles and autotunes whatever depends on it (a peer's kernels may tune
    # per length); its time is kept as first_ms, the second run is the row's.
    first_ms = _timed_ms(once, run.device)
    out_box.clear()  # (outside the timed call: freeing the cache and collecting take host time)
    gc.collect()
    run.reset_peak()
    ms = _timed_ms(once, run.device)
    out = out_box["out"]
    if B == 1:
        run.context = ((name, T), _cache_of(out), out.logits[:, -1])
    return {"ms": ms, "first_ms": first_ms, "tokens_per_s": B * T / (ms / 1e3), "peak_gb": run.peak_gb()}


def _graph_decoder(run: Runner, model, B: int, T: int, cache, logits, compile: bool = False):
    from lasp_hf.modeling.generation_lasp import LaspGraphDecoder

    steps = run.decode_steps + 8
    hybrid = "full_attention" in model.config.layer_types
    slots = -(-(T + steps + 1) // 256) * 256 if hybrid else 0
    decoder = LaspGraphDecoder(model, cache, slots, compile=compile)
    decoder.set_tokens([], 0)
    mask = torch.ones(B, T, dtype=torch.long, device=run.device)
    decoder.start(cache, mask, logits.argmax(dim=-1), steps + 1)
    return decoder


def _graph_check(run: Runner, name: str, model, T: int, key: str, compile: bool = False) -> str:
    """Greedy tokens of the graph against eager steps from the same prefilled cache (B = 1)."""
    if key in run.checks:
        return run.checks[key]
    cache, logits = run.prefilled(name, T)
    decoder = _graph_decoder(run, model, 1, T, cache, logits, compile)
    graph_tokens = decoder.run(run.check_steps + 1)[:, 1:]
    del decoder
    first = logits.argmax(dim=-1, keepdim=True)
    eager_tokens = eager_steps(model, cache, first, run.check_steps)  # consumes the context's cache
    run.context = None
    same = torch.equal(graph_tokens.cpu(), eager_tokens.cpu())
    run.checks[key] = (
        "ok" if same else f"mismatch: graph {graph_tokens.tolist()} eager {eager_tokens.tolist()}"
    )
    return run.checks[key]


def graph_kernels(fn, steps: int, device, top: int = 12) -> dict:
    """Where a graph step's time goes (`--profile-graph`): kernels per step, their summed GPU time per step and
    the `top` kernels by time (microseconds per step), over one call of fn (`steps` steps)."""
    count, per_kernel = cuda_kernel_times(fn, device)
    return {
        "kernels_per_step": count / steps,
        "kernel_us_per_step": sum(per_kernel.values()) * 1e3 / steps,
        "top_kernels_us": {name[:120]: round(ms * 1e3 / steps, 2) for name, ms in list(per_kernel.items())[:top]},
    }


@contextlib.contextmanager
def fused_decode(mode: str | None):
    """`layers_lasp.FUSED_DECODE` set to mode inside the block ("never": the decoding step's plain PyTorch code;
    None: as it is, `--fused-decode`)."""
    from lasp_hf.modeling import layers_lasp

    before = layers_lasp.FUSED_DECODE
    layers_lasp.FUSED_DECODE = mode or before
    try:
        yield
    finally:
        layers_lasp.FUSED_DECODE = before


def case_decode(run: Runner, name: str, variant: str, B: int, T: int, smallest_T: int) -> dict:
    """variant: "graph" (the CUDA-graph step), "graph-plain" (the same without the fused decoding kernels, its
    eager check also without them), "graph-compiled" (graph-plain's step through `torch.compile`),
    "graph-unfused" (graph-plain's step with one product per projection: `unfuse_projections`) or "eager"."""
    plain = variant in ("graph-plain", "graph-compiled", "graph-unfused")
    with fused_decode("never" if plain else None), unfused(run, name, variant == "graph-unfused"):
        return _decode_row(run, name, variant.split("-")[0], B, T, smallest_T, key=f"{name}-{variant}",
                           compile=variant == "graph-compiled")


@contextlib.contextmanager
def unfused(run: Runner, name: str, on: bool):
    """Our model with its projections unfused inside the block (when on), fused again after."""
    model = run.get_model(name) if on else None
    if model is not None:
        model.unfuse_projections()
    try:
        yield
    finally:
        if model is not None:
            model.fuse_projections()


def _decode_row(run: Runner, name: str, variant: str, B: int, T: int, smallest_T: int, key: str,
                compile: bool = False) -> dict:
    model = run.get_model(name)
    row = {}
    if variant == "graph":
        row["check"] = _graph_check(run, name, model, smallest_T, key, compile)
    if B == 1:
        cache, logits = run.prefilled(name, T)
    else:
        run.context = None
        gc.collect()
        run.check_fits(B, T, copies=2 if variant == "graph" else 1)
        cache = synthetic_cache(name, model, B, T)
        logits = torch.zeros(B, model.config.vocab_size, device=run.device)
    run.reset_peak()
    if variant == "graph":
        run.check_fits(B, T, copies=2)
        decoder = _graph_decoder(run, model, B, T, cache, logits, compile)
        cache = None  # the decoder holds its own copy; a B = 1 context stays for the eager row that follows
        gc.collect()
        decoder.steps(4)
        ms = _timed_ms(lambda: decoder.steps(run.decode_steps), run.device)
        if run.profile_graph and run.device.type == "cuda":
            row.update(graph_kernels(lambda: decoder.steps(run.decode_steps), run.decode_steps, run.device))
        del decoder
    else:
        token = logits.argmax(dim=-1, keepdim=True)
        eager_steps(model, cache, token, 4)
        ms = _timed_ms(lambda: eager_steps(model, cache, token, run.decode_steps), run.device)
        if B == 1:
            run.context = None  # the cache has moved on by the decoded tokens
    row.update(ms_per_token=ms / run.decode_steps, peak_gb=run.peak_gb())
    return row


class _StopAfter:
    """A stopping criterion: stop once the sequences reach `length` tokens."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, device=input_ids.device)


def case_generate(run: Runner, name: str, path: str, B: int, T: int) -> dict:
    """ms/token of model.generate: two calls that differ only in the number of new tokens."""
    model = run.get_model(name)
    run.context = None
    gc.collect()
    run.check_fits(B, T + 2 * run.generate_steps, copies=2)
    ids = run.ids(B, T, seed=1)
    short, long = 8, 8 + run.generate_steps
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if path == "static":
        kwargs["cache_implementation"] = "static"
        kwargs.pop("do_sample")
    if path == "compiled":
        if run.device.type != "cuda":
            raise Skip("transformers' compiled static-cache decoding needs CUDA")
        from transformers import StoppingCriteriaList

        kwargs["cache_implementation"] = "static"

        def call(n):
            criteria = StoppingCriteriaList([_StopAfter(T + n)])
            return model.generate(ids, max_new_tokens=long, stopping_criteria=criteria, **kwargs)
    else:

        def call(n):
            return model.generate(ids, max_new_tokens=n, **kwargs)

    for _ in range(3 if path == "compiled" else 1):  # compile / capture, then the reduce-overhead recordings
        call(long)
    times, lengths = {}, {}
    run.reset_peak()
    for n in (short, long):
        outputs = []
        times[n] = min(
            _timed_ms(lambda n=n, outputs=outputs: outputs.append(call(n)), run.device) for _ in range(2)
        )
        lengths[n] = outputs[-1].shape[1] - T
    if lengths[long] <= lengths[short]:
        raise RuntimeError(f"generate stopped early: {lengths} new tokens")
    return {
        "ms_per_token": (times[long] - times[short]) / (lengths[long] - lengths[short]),
        "peak_gb": run.peak_gb(),
        "new_tokens": lengths,
    }


def build_cases(models, lengths, batch_sizes, with_compiled: bool, plain_graph: bool = False,
                compiled_graph: bool = False, unfused_graph: bool = False) -> Registry:
    """The cases in run order: per model, the generate rows, then per length its prefill and decode rows
    (plain_graph: also the graph step without the fused decoding kernels; compiled_graph: also that step
    through `torch.compile`; unfused_graph: also that step with one product per projection)."""
    cases = Registry()
    smallest = min(lengths)
    for name in models:
        if name in OURS:
            cases.case(f"{name}-generate-eager", dict(B=1, T=smallest))(
                lambda run, B, T, name=name: case_generate(run, name, "eager", B, T)
            )
            cases.case(f"{name}-generate-static", dict(B=1, T=smallest))(
                lambda run, B, T, name=name: case_generate(run, name, "static", B, T)
            )
        if name == "llama-1b" and with_compiled:
            T = COMPILED_LENGTH if COMPILED_LENGTH in lengths else max(lengths)
            cases.case(f"{name}-generate-compiled", dict(B=1, T=T))(
                lambda run, B, T, name=name: case_generate(run, name, "compiled", B, T)
            )
        variants = ("eager",)
        if name in OURS:
            variants = (("graph",) + ("graph-plain",) * plain_graph + ("graph-compiled",) * compiled_graph
                        + ("graph-unfused",) * unfused_graph + variants)
        for T in lengths:
            cases.case(f"{name}-prefill", dict(B=1, T=T))(
                lambda run, B, T, name=name: case_prefill(run, name, B, T)
            )
            for B in batch_sizes:
                for variant in variants:
                    cases.case(f"{name}-decode-{variant}", dict(B=B, T=T))(
                        lambda run, B, T, name=name, variant=variant: case_decode(
                            run, name, variant, B, T, smallest
                        )
                    )
    return cases


# ----------------------------------------------------------------------------- summary


def _find(rows, case_prefix, T=None, B=1):
    for row in rows:
        if (
            row["case"].startswith(case_prefix)
            and row.get("status") == "ok"
            and row["B"] == B
            and (T is None or row["T"] == T)
        ):
            return row
    return None


def _cell(row, key):
    """The row's number, or its status where it did not run (OOM, skipped, failed)."""
    if row is None:
        return None
    return row.get(key) if row.get("status") == "ok" else row["status"].split(":")[0]


def summary_tables(rows) -> tuple[list, list, list, list]:
    """Compact tables for the README: prefill (model x T: tokens/s, peak GB) and decode (model and path x T:
    ms/token at each batch size)."""
    prefill, decode = {}, {}
    for row in rows:
        case = row["case"]
        if "-prefill-" in case:
            prefill[(row["model"], row["T"])] = {
                "model": row["model"],
                "T": short_number(row["T"]),
                "tokens_per_s": _cell(row, "tokens_per_s"),
                "peak_gb": _cell(row, "peak_gb"),
            }
        elif "-decode-" in case or "-generate-compiled" in case:
            path = case.split("-B")[0].split("-", 2)[2].replace("decode-", "").replace("generate-", "")
            line = decode.setdefault(
                (row["model"], path, row["T"]),
                {"model": f"{row['model']} {path}", "T": short_number(row["T"])},
            )
            line[f"B{row['B']}"] = _cell(row, "ms_per_token")
    batch_sizes = sorted({row["B"] for row in rows})
    prefill_cols = [
        Column("model", "model"),
        Column("T", "T"),
        Column("tokens_per_s", "prefill tokens/s", "{:,.0f}"),
        Column("peak_gb", "peak GB", "{:.1f}"),
    ]
    decode_cols = [Column("model", "model, decode path"), Column("T", "context")] + [
        Column(f"B{B}", f"ms/token B={B}", "{:.2f}") for B in batch_sizes
    ]
    # Decode lines grouped by model and path (in run order), then by context length.
    first_seen = {}
    for model, path, _ in decode:
        first_seen.setdefault((model, path), len(first_seen))
    decode_lines = [decode[key] for key in sorted(decode, key=lambda k: (first_seen[k[:2]], k[2]))]
    return list(prefill.values()), prefill_cols, decode_lines, decode_cols


def targets(rows, lengths) -> list[str]:
    """The issue's targets, read off the rows (a target whose rows are missing says so)."""
    notes = []
    graph = [
        r for r in rows if r["case"].startswith("tnl-1b-decode-graph-B") and r["B"] == 1 and r["status"] == "ok"
    ]
    checked = all(r.get("check") == "ok" for r in graph)
    if graph and checked:
        ms = [r["ms_per_token"] for r in graph]
        notes.append(
            f"tnl-1b graph decode B=1 from {short_number(graph[0]['T'])} to {short_number(graph[-1]['T'])}:"
            f" {min(ms):.3f}-{max(ms):.3f} ms/token, spread {max(ms) / min(ms) - 1:.1%} (target <= 10%)"
        )
    elif graph:
        notes.append("tnl-1b graph decode: the token check failed, no speed reported as a result")
    at32 = 32 * KI
    ours32 = _find(rows, "tnl-1b-decode-graph-B", at32)
    llama32 = [
        r
        for r in (_find(rows, "llama-1b-decode-eager", at32), _find(rows, "llama-1b-generate-compiled", at32))
        if r
    ]
    if ours32 and llama32 and checked:
        best = min(llama32, key=lambda r: r["ms_per_token"])
        path = "compiled static cache" if "compiled" in best["case"] else "eager; the compiled row did not run"
        notes.append(
            f"32K, B=1: tnl-1b graph {ours32['ms_per_token']:.3f} ms/token vs Llama's best measured "
            f"({path}) {best['ms_per_token']:.3f}: {ours32['ms_per_token'] / best['ms_per_token']:.2f}x "
            "(target <= 0.33x)"
        )
    for B in (1, 32):
        fused = _find(rows, "tnl-1b-decode-graph-B", at32, B)
        unfused_row = _find(rows, "tnl-1b-decode-graph-unfused", at32, B)
        if fused and unfused_row:
            notes.append(
                f"32K, B={B}: tnl-1b graph step with fused projections {fused['ms_per_token']:.3f} ms/token, with one "
                f"product per projection {unfused_row['ms_per_token']:.3f} "
                f"({unfused_row['ms_per_token'] / fused['ms_per_token']:.2f}x)"
            )
    eager = _find(rows, "tnl-1b-generate-eager")
    static = _find(rows, "tnl-1b-generate-static")
    if eager and static and checked:
        notes.append(
            f"tnl-1b generate at {short_number(eager['T'])}, B=1: eager {eager['ms_per_token']:.3f} ms/token,"
            f" static (CUDA graph) {static['ms_per_token']:.3f}: "
            f"{eager['ms_per_token'] / static['ms_per_token']:.1f}x faster (target >= 3x)"
        )
    at128 = 128 * KI
    ours_p, fla_p = _find(rows, "tnl-1b-prefill", at128), _find(rows, "retnet-1b-prefill", at128)
    if ours_p and fla_p:
        notes.append(
            f"prefill 128K: tnl-1b {ours_p['tokens_per_s']:.0f} tokens/s vs fla RetNet "
            f"{fla_p['tokens_per_s']:.0f}: {ours_p['tokens_per_s'] / fla_p['tokens_per_s']:.2f}x "
            "(target >= 2x)"
        )
    big = _find(rows, "tnl-1b-prefill", 1024 * KI)
    if big and big.get("peak_gb") is not None:
        notes.append(f"tnl-1b 1M-token prefill: peak {big['peak_gb']:.1f} GB (target <= 30 GB)")
    return notes


def plot(rows, path: Path) -> Path | None:
    """Decode ms/token at B = 1 against the context length, one line per model and path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[generate_speed] matplotlib is not installed: no plot", file=sys.stderr)
        return None
    lines: dict = {}
    for row in rows:
        if (
            row.get("status") == "ok"
            and row["B"] == 1
            and row.get("ms_per_token") is not None
            and ("-decode-" in row["case"] or "-generate-compiled" in row["case"])
        ):
            label = row["case"].rsplit("-B", 1)[0].replace("-decode", "")
            lines.setdefault(label, []).append((row["T"], row["ms_per_token"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode ms / token (B = 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COLUMNS = [
    Column("case", "case"),
    Column("status", "status"),
    Column("tokens_per_s", "prefill tok/s", "{:,.0f}"),
    Column("ms_per_token", "decode ms/tok", "{:.3f}"),
    Column("peak_gb", "peak GB", "{:.1f}"),
    Column("check", "graph check"),
]


def _lengths(values):
    return tuple(parse_length(value) for value in values)


def main(argv=None) -> int:
    parser = common_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(OURS + PEERS), help="models to run")
    parser.add_argument("--lengths", nargs="*", default=None, help="context lengths, e.g. 8K 32K 1M")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=None, help="decode batch sizes (1 32)")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed decoding steps per row (64)")
    parser.add_argument(
        "--generate-steps", type=int, default=None, help="extra tokens of the generate rows (128)"
    )
    parser.add_argument("--check-steps", type=int, default=16, help="tokens of the graph-vs-eager check")
    parser.add_argument("--no-compiled", action="store_true", help="skip Llama's compiled static-cache row")
    parser.add_argument(
        "--profile-graph",
        action="store_true",
        help="decode-graph rows also record kernels per step and the top kernels' time (torch.profiler, CUDA)",
    )
    parser.add_argument(
        "--fused-decode",
        choices=("auto", "never"),
        default="auto",
        help="our decoding steps with the fused decoding kernels (auto, on CUDA) or without (never); every row",
    )
    parser.add_argument(
        "--plain-graph",
        action="store_true",
        help="also time our graph step without the fused decoding kernels (decode-graph-plain rows)",
    )
    parser.add_argument(
        "--compiled-graph",
        action="store_true",
        help="also time the plain graph step run through torch.compile (decode-graph-compiled rows)",
    )
    parser.add_argument(
        "--unfused-graph",
        action="store_true",
        help="also time the plain graph step with one product per projection (decode-graph-unfused rows)",
    )
    parser.add_argument(
        "--hybrid-max-prefill",
        default="128K",
        help="longest hybrid-1b prefill row (its softmax layers are quadratic; default 128K)",
    )
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = _lengths(args.lengths) if args.lengths else (TINY_LENGTHS if args.tiny else LENGTHS)
    batch_sizes = tuple(args.batch_sizes or ((1, 2) if args.tiny else BATCH_SIZES))
    decode_steps = args.decode_steps or (4 if args.tiny else 64)
    generate_steps = args.generate_steps or (4 if args.tiny else 128)
    unknown = sorted(set(args.models) - set(OURS + PEERS))
    if unknown:
        parser.error(f"unknown models {unknown}; the models are {list(OURS + PEERS)}")
    cases = build_cases(
        args.models, lengths, batch_sizes, not args.no_compiled, args.plain_graph, args.compiled_graph,
        args.unfused_graph,
    ).select(args.cases)
    if args.dry_run:
        print("\n".join(case.name for case in cases))
        return 0

    env = environment(device)
    run = Runner(
        device,
        dtype,
        args.tiny,
        decode_steps,
        generate_steps,
        min(args.check_steps, decode_steps),
        _lengths([args.hybrid_max_prefill])[0],
    )
    run.profile_graph = args.profile_graph
    from lasp_hf.modeling import layers_lasp

    layers_lasp.FUSED_DECODE = args.fused_decode  # every row of ours (the generate rows too)
    name = f"generate-{card_slug(env['card'])}" + ("-tiny" if args.tiny else "")
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    extra = {"lengths": lengths, "batch_sizes": batch_sizes, "decode_steps": decode_steps}
    rows, sizes = [], {}

    def save(notes) -> Path:
        return write_results(
            name, env, rows, COLUMNS, out_dir=out_dir, notes=notes, extra={**extra, "parameters": sizes}
        )

    for case in cases:
        row = {
            "case": case.name,
            "model": case.name.split("-")[0] + "-" + case.name.split("-")[1],
            "B": case.params["B"],
            "T": case.params["T"],
        }
        begin = time.perf_counter()
        try:
            with torch.no_grad():
                row.update(case(run))
            row["status"] = "ok"
        except Skip as err:
            row["status"] = f"skipped: {err}"
        except torch.OutOfMemoryError as err:
            row["status"] = "OOM"
            row["error"] = str(err).split("\n")[0][:200]
        except Exception as err:  # noqa: BLE001 - one failing row is recorded, the others still run
            row["status"] = f"failed: {type(err).__name__}"
            row["error"] = str(err)[:300]
        if row["status"] != "ok":
            # Here, not in the handler: the exception's frames (and their tensors) are gone only after it.
            run.free()
        row["wall_s"] = round(time.perf_counter() - begin, 2)
        if run.model is not None and run.name not in sizes:
            sizes[run.name] = num_params(run.model)
        if row.get("check", "ok") != "ok" and row["status"] == "ok":
            row["status"] = "check failed"
        # The whole row, so that a run stopped part-way still leaves its measurements in the log.
        print(f"[generate_speed] {case.name}: {row['status']} ({row['wall_s']} s) {json.dumps(row, default=str)}",
              flush=True)
        rows.append(row)
        save([f"partial: {len(rows)} of {len(cases)} cases"])  # a run stopped part-way keeps what it measured
    run.name, run.model = None, None
    run.free()

    notes = targets(rows, lengths) + [f"parameters: {json.dumps(sizes)}", f"dtype {dtype}, device {device}"]
    json_path = save(notes)
    png = plot(rows, out_dir / f"{name}.png")
    print_table(f"generate speed on {env['card']} (commit {env['commit'][:12]})", rows, COLUMNS)
    prefill_rows, prefill_cols, decode_rows, decode_cols = summary_tables(rows)
    summary = [
        f"# {name} summary",
        "",
        describe_env(env),
        "",
        format_table(prefill_rows, prefill_cols, markdown=True),
        "",
        format_table(decode_rows, decode_cols, markdown=True),
        "",
    ] + [f"- {note}" for note in notes]
    (out_dir / f"{name}-summary.md").write_text("\n".join(summary) + "\n")
    print_table("prefill (B = 1)", prefill_rows, prefill_cols)
    print_table("decode", decode_rows, decode_cols)
    for note in notes:
        print(f"- {note}")
    print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
