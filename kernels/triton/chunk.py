"""Chunked linear attention with decay in Triton: launchers, forward, backward, the autograd wrapper and
the public function (the kernels are in `chunk_kernels`).

Shapes: B batch, T tokens, H heads, K key/query head dim, V value head dim, N sequences (B for
dense input, the packed count with cu_seqlens), BT chunk length (64), S segments.

The math is that of `lasp_hf.kernels.reference` (per chunk, b the cumulative log-decay from the
chunk's start, causal mask M):
    o     = scale * ( (q k^T * M * exp(b_i - b_j)) v + exp(b) * (q S_prev) )
    S_new = exp(b_last) S_prev + (k * exp(b_last - b))^T v
Dense input is treated as B packed sequences of length T, so every kernel sees one flat token axis.

Work is split into segments (runs of consecutive chunks of one sequence) to fill the GPU when B*H
is small, with LASP's decomposition inside one device:
  1. `_fwd_kernel_segment_state`: each segment's state from a zero start, and its total log-decay;
  2. `_kernel_segment_scan`: S_in(s) = exp(a_{s-1}) S_in(s-1) + S_loc(s-1), per sequence;
  3. `_fwd_kernel_output`: each segment scans its chunks from S_in(s) and writes o.
When every sequence fits one segment (B*H already fills the GPU), steps 1-2 are skipped.
Backward mirrors it: the segments' local dS (reverse scan over q, do), a reverse combine giving
dS at each segment's end (and d initial_state), then reverse scans for dv (blocked over V) and dk
(blocked over K) and a forward scan for dq (blocked over K): each gradient is blocked along the axis it
does not sum over, so every program writes finished values. With B the cumulative log-decay from a sequence's start, the decay gradient follows from
    dL/dB_t = q_t . dq_t - k_t . dk_t  (+ <dS_final, S_final> at the sequence's last token),
    dg_t = sum_{u >= t} dL/dB_u        (a reverse cumulative sum within each sequence),
since o and S_final depend on B only through q_t exp(B_t), k_u exp(-B_u) and exp(B_last).
q.dq and k.dk are large and nearly cancel, and the reverse sum carries their rounding over the whole
sequence, so with bf16 / fp16 inputs the terms are formed more exactly when g needs a gradient: a chunk's
own pairs as row minus column sums of A = (q k^T) * (do v^T) * decay in float32, and the state products
with the float32 state split into two bf16 halves (`chunk_kernels._dot_f32_left` / `_dot_f32_right`, SPLIT).
g = -inf restarts the state; the kernels mask every decay factor that spans a restart to 0 instead of forming
exp(-inf + inf) (`chunk_kernels._chunk_decay`), and dg is 0 there.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lasp_hf.kernels.triton.chunk_kernels import (
    _bwd_kernel_dk,
    _bwd_kernel_dq,
    _bwd_kernel_dv,
    _bwd_kernel_segment_dstate,
    _fwd_kernel_output,
    _fwd_kernel_segment_state,
    _kernel_segment_scan,
)
from lasp_hf.kernels.host import device_tables, host_bounds
from lasp_hf.kernels.triton.utils import cdiv, empty, interpreting, next_pow2

CHUNK_SIZE = 64
# Per pass: (largest K x V state tile one program holds, in float32 elements; num_warps; num_stages).
# The tile sets the V block of programs that hold all of K (forward, dS, dv) and the K block of those that
# hold all of V (dk, dq); "state" is the SP state-only passes (`state_only`, 128 x 64 tiles). Chosen from
# H100 sweeps of these settings (git history: benchmarks/kernel_sweep.py and its results): the forward holds the
# whole 128 x 128 state with 8 warps, so q and k are read once per chunk (0.57 -> 0.49 ms at B1 H16 T32K,
# 2.06 -> 1.54 ms at 128K, same sweep); the backward is best at 128 x 64 with 4 warps.
# "fwd_state" / "bwd_state" are step 1 of the forward / backward (the segments' states / state gradients); an
# optional fourth entry is the tokens a step takes (default CHUNK_SIZE): 128-token steps took the forward at B1
# H16 T32K from 0.475 to 0.439 ms (output kernel 316 -> 287 us, segment states 126 -> 118 us;
# per-kernel breakdown on an H100). "scan" is the walks over segments (the forward's and the backward's
# step 2, the SP folds): (flat state elements per program, num_warps, num_stages).
CONFIGS = {"fwd": (16384, 8, 2, 128), "bwd": (8192, 4, 2), "state": (8192, 4, 2),
           "fwd_state": (16384, 4, 2, 128), "bwd_state": (8192, 4, 2), "scan": (512, 4, 1)}
# Segments are planned for about this many programs per SM when B*H alone does not fill the device.
PROGRAMS_PER_SM = 4
# A sequence is cut into segments when it is more than this many times longer than the work per program
# slot (packed documents of very different lengths), even if the (sequence, head) programs fill the device.
MAX_IMBALANCE = 4
# Set (e.g. by tests) to force a number of chunks per segment; None plans it from the device.
CHUNKS_PER_SEGMENT = None
# float32 inputs: three tf32 products per dot (about float32 accuracy on the tensor cores); "ieee" is
# exact but runs the products on the FMA units.
FP32_DOT_PRECISION = "tf32x3"
G_NONE, G_HEAD, G_TOKEN = 0, 1, 2  # the kernels' G_MODE


# ----------------------------------------------------------------------------- launchers

class _Plan:
    """How the flat token axis is cut: segments of at most `chunks_per_segment` chunks, each inside one
    sequence. The tables are built on the host and reach the tensors' device in two copies that do not wait
    for the GPU (`lasp_hf.kernels.host`): int32 for the kernels, int64 for indexing."""

    def __init__(self, bounds: list[int], device, chunks_per_segment: int):
        lengths = torch.tensor(bounds[1:], dtype=torch.int64) - torch.tensor(bounds[:-1], dtype=torch.int64)
        span = chunks_per_segment * CHUNK_SIZE
        num_segs = (lengths + span - 1) // span
        first_seg = torch.cumsum(num_segs, 0) - num_segs
        seg_seq = torch.repeat_interleave(torch.arange(len(lengths)), num_segs)
        seg_local = torch.arange(int(num_segs.sum())) - first_seg[seg_seq]
        starts = torch.tensor(bounds[:-1], dtype=torch.int64)
        seg_bos = starts[seg_seq] + seg_local * span
        seg_eos = torch.minimum(seg_bos + span, starts[seg_seq] + lengths[seg_seq])
        self.num_seqs = len(lengths)
        self.num_segs = int(num_segs.sum())
        self.max_segs = int(num_segs.max()) if len(lengths) else 0
        self.num_tokens = int(lengths.sum())
        self.chunks_per_segment = chunks_per_segment
        kernel_tables = device_tables({"seg_bos": seg_bos, "seg_eos": seg_eos, "seq_first_seg": first_seg,
                                       "seq_num_segs": num_segs}, device, torch.int32)
        index_tables = device_tables({
            "first_seg_index": first_seg.clamp(max=max(self.num_segs - 1, 0)),
            "last_seg_index": (first_seg + num_segs - 1).clamp(min=0),
            "seg_seq": seg_seq, "lengths": lengths, "seq_ends": torch.cumsum(lengths, 0),
        }, device)
        self.seg_bos, self.seg_eos = kernel_tables["seg_bos"], kernel_tables["seg_eos"]
        self.seq_first_seg, self.seq_num_segs = kernel_tables["seq_first_seg"], kernel_tables["seq_num_segs"]
        self.first_seg_index, self.last_seg_index = index_tables["first_seg_index"], index_tables["last_seg_index"]
        self.seg_seq, self.lengths, self.seq_ends = index_tables["seg_seq"], index_tables["lengths"], \
            index_tables["seq_ends"]
        self.nonempty = self.lengths > 0


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _blocks(K: int, V: int, phase: str) -> tuple[int, int]:
    BK = max(16, next_pow2(K))
    BV = min(max(16, next_pow2(V)), max(16, CONFIGS[phase][0] // BK))
    return BK, BV


def _blocks_k(K: int, V: int, phase: str) -> tuple[int, int]:
    """(K block, whole V) for the kernels that hold rows of the state."""
    BV = max(16, next_pow2(V))
    BK = min(max(16, next_pow2(K)), max(16, CONFIGS[phase][0] // BV))
    return BK, BV


def _make_plan(bounds: list[int], H: int, NV: int, device) -> _Plan:
    """Chunks per segment (cps). With W the chunk-steps per program slot if all (chunk, head, V block) work
    were spread evenly over PROGRAMS_PER_SM programs per SM: one segment per sequence when those programs
    already fill the device and no sequence is longer than MAX_IMBALANCE x W chunks (dense batches, packed
    documents of similar lengths); otherwise segments of about W chunks, so that a long sequence (B*H too
    small, or one long document among short ones) is scanned by many programs in parallel. The compiled
    kernels walk only a segment's own chunks, so short sequences cost their length, not cps."""
    chunks = [(b - a + CHUNK_SIZE - 1) // CHUNK_SIZE for a, b in itertools.pairwise(bounds)]
    max_chunks = max(max(chunks), 1)
    if CHUNKS_PER_SEGMENT is not None:
        cps = CHUNKS_PER_SEGMENT
    else:
        sms = _num_sms(device)
        programs = len(chunks) * H * NV
        per_slot = max(1, cdiv(sum(chunks) * H * NV, PROGRAMS_PER_SM * sms))
        if programs >= sms and max_chunks <= MAX_IMBALANCE * per_slot:
            cps = max_chunks
        else:
            cps = cdiv(max_chunks, cdiv(max_chunks, per_slot))  # even segments of the longest
    return _Plan(bounds, device, cps)


def _planning_knobs() -> tuple:
    """The module settings `_make_plan` reads (tests change them), part of the plan caches' keys."""
    return (CHUNKS_PER_SEGMENT, PROGRAMS_PER_SM, MAX_IMBALANCE)


@functools.lru_cache(maxsize=16)
def _packed_plan(bounds: tuple[int, ...], H: int, NV: int, device, knobs) -> _Plan:
    """The plan of one packed batch, made once for all its layers (forward and backward); `knobs` keys the
    planning settings (`_planning_knobs`)."""
    return _make_plan(bounds, H, NV, device)


@functools.lru_cache(maxsize=64)
def _dense_plan(B: int, T: int, H: int, NV: int, device, knobs) -> _Plan:
    return _make_plan([b * T for b in range(B + 1)], H, NV, device)


_SCRATCH: dict = {}
_SCRATCH_VIEWS: dict = {}


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's allocator for the descriptors' scratch: one buffer per (device, stream), grown as needed.

    Kernels launched on one stream run one after another, so they can share it; this saves a
    torch.empty per launch, which is a noticeable part of a launch's host time. The view handed out for
    a (size, alignment) is kept too: a launch then costs a dictionary look-up here.
    """
    key = (torch.cuda.current_device(), stream)
    view = _SCRATCH_VIEWS.get((key, size, alignment))
    if view is not None:
        return view
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < size + alignment:
        buf = torch.empty(max(2 * size + alignment, 1 << 20), dtype=torch.int8, device="cuda")
        _SCRATCH[key] = buf
        for old in [k for k in _SCRATCH_VIEWS if k[0] == key]:
            del _SCRATCH_VIEWS[old]
    offset = (-buf.data_ptr()) % alignment
    view = _SCRATCH_VIEWS[(key, size, alignment)] = buf[offset:offset + size]
    return view


def _fwd_v_blocks(K: int, V: int) -> int:
    """V blocks per head of the forward's programs (the plans count programs per (row, head, V block))."""
    return cdiv(V, _blocks(K, V, "fwd")[1])


def _op_dense_plan(B: int, T: int, H: int, K: int, V: int, device) -> _Plan:
    """The (cached) plan of the op on dense input."""
    return _dense_plan(B, T, H, _fwd_v_blocks(K, V), device, _planning_knobs())


def _config(phase: str, dtype, BK: int, device) -> dict:
    if interpreting():
        return {}
    # Tensor descriptors made inside kernels need a little global scratch memory per launch. Triton keeps
    # the allocator in a context variable, so it is set on every call (backward runs in autograd's thread).
    triton.set_allocator(_scratch)
    return dict(_launch_options(CONFIGS[phase], dtype, BK))


@functools.lru_cache(maxsize=256)
def _launch_options(config: tuple, dtype, BK: int) -> tuple:
    """(("num_warps", w), ("num_stages", s)) for a phase's settings `config` (CONFIGS[phase], passed by value:
    benchmarks and tests change CONFIGS at run time)."""
    num_warps, num_stages = config[1:3]
    if BK >= 256:
        num_warps = max(num_warps, 8)   # 64 x 256 q and k tiles spill heavily with 4 warps
        num_stages = min(num_stages, 2)  # three stages of 64 x 256 q and k tiles would not fit shared memory
    if dtype == torch.float32:
        # float32 tiles are twice as large: a second pipeline stage would not fit in shared memory.
        num_stages = 1
    return ("num_warps", num_warps), ("num_stages", num_stages)


def _dot_dtype(dtype):
    """Operand type of the matrix products: the input's, except in the interpreter, whose bfloat16
    arithmetic is wrong (Triton 3.9: products of bfloat16 blocks come out as garbage), so it gets float32."""
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return tl.float16 if dtype == torch.float16 else tl.float32


def _dot_precision(dtype) -> str:
    # bf16 / fp16 operands ignore it; float32 must not fall to plain tf32 (~3e-4 relative error).
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned start, as tensor descriptors (TMA) require."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _flat_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] as the kernels read it: [B*T, H, D], contiguous and aligned."""
    B, T, H, D = x.shape
    return _aligned(x.reshape(B * T, H, D))


def _g_mode(g) -> int:
    if g is None:
        return G_NONE
    return G_HEAD if g.dim() == 1 else G_TOKEN


def _launch_setup(q, v, g, plan: _Plan, phase: str, accurate_states: bool):
    """Sizes, block shapes and kernel meta-parameters shared by the forward and backward launchers."""
    _, H, K = q.shape
    V = v.shape[-1]
    NV, cfg, meta, scan = _setup_for(phase, CONFIGS[phase], q.dtype, H, K, V, _g_mode(g), accurate_states,
                                     interpreting(), FP32_DOT_PRECISION)
    if cfg:
        triton.set_allocator(_scratch)  # (see `_config`)
    return H, K, V, NV, plan.num_segs, cfg, meta, scan


@functools.lru_cache(maxsize=1024)
def _setup_for(phase: str, config: tuple, dtype, H: int, K: int, V: int, g_mode: int, accurate_states: bool,
               interpret: bool, fp32_precision: str):
    """`_launch_setup`'s part that depends only on settings, shapes and dtype: computed once per combination
    (a layer launches about ten kernels, and this Python is on the host's critical path at medium T). The
    settings that tests and benchmarks change at run time are part of the key. The dicts are shared: callers
    only unpack them."""
    BK, BV = _blocks(K, V, phase)
    cfg = {} if interpret else dict(_launch_options(config, dtype, BK))
    meta = dict(H=H, K=K, V=V, BK=BK, BV=BV)
    scan = dict(G_MODE=g_mode, BT=_step_tokens(phase, dtype, BK), DT=_dot_dtype(dtype),
                DOT_PREC=_dot_precision(dtype), SPLIT=accurate_states and dtype != torch.float32,
                DYN_LOOP=not interpret, **meta)
    return cdiv(V, BV), cfg, meta, scan


def _step_tokens(phase: str, dtype=torch.bfloat16, BK: int = 128) -> int:
    """Tokens a scan kernel of this phase takes per step: CONFIGS' optional fourth entry, else CHUNK_SIZE. Any
    multiple of 16 gives the same result (segments end wherever a step runs past them: zeros are read there).
    Steps longer than CHUNK_SIZE only for 16-bit inputs with K blocks up to 128: float32 or 256-wide tiles of
    128 tokens would not fit shared memory (the same choice in the interpreter, so CPU tests run both)."""
    config = CONFIGS[phase]
    if len(config) <= 3 or (config[3] > CHUNK_SIZE and (dtype == torch.float32 or BK > 128)):
        return CHUNK_SIZE
    return config[3]


def _loop_bound(plan: _Plan, scan: dict, BT: int | None = None) -> int:
    """A scan kernel's CPS argument: for the interpreter, the loop bound (the plan's segment length in steps of BT
    tokens, or in chunks without BT); 0 for compiled kernels, which walk each segment's own chunks and never read
    it. A constant keeps packed batches whose plans differ on the same compiled kernels: Triton specializes an
    integer on being 1 (even under do_not_specialize) and on divisibility by 16, and each new variant is about a
    second of compilation in the middle of training."""
    if scan["DYN_LOOP"]:
        return 0
    return plan.chunks_per_segment if BT is None else cdiv(plan.chunks_per_segment * CHUNK_SIZE, BT)


def _launch_segment_state(k, v, g, plan: _Plan, accurate_states: bool):
    """Step 1 of the forward: every segment's state from zero [S, H, K, V] and its log-decay [S, H]."""
    H, K, V, NV, S, cfg, meta, scan = _launch_setup(k, v, g, plan, "fwd_state", accurate_states)
    s_loc = empty(k, (S, H, K, V), torch.float32)
    seg_decay = empty(k, (S, H), torch.float32)
    _fwd_kernel_segment_state[(S, H, NV)](
        k, v, g if g is not None else k, s_loc, seg_decay, plan.seg_bos, plan.seg_eos,
        _loop_bound(plan, scan, scan["BT"]), NV=NV, **scan, **cfg)
    return s_loc, seg_decay


def _launch_segment_dstate(q, do, g, scale, plan: _Plan, need_dg: bool, store_decay: bool = False):
    """Step 1 of the backward: every segment's dL/dS_in from its own outputs [S, H, K, V] (and, with
    store_decay, the segments' log-decays [S, H], else None)."""
    H, K, V, NV, S, cfg, meta, scan = _launch_setup(q, do, g, plan, "bwd_state", need_dg)
    ds_loc = empty(q, (S, H, K, V), torch.float32)
    seg_decay = empty(q, (S, H), torch.float32) if store_decay else ds_loc
    _bwd_kernel_segment_dstate[(S, H, NV)](
        q, do, g if g is not None else q, ds_loc, seg_decay, plan.seg_bos, plan.seg_eos, scale,
        _loop_bound(plan, scan, scan["BT"]), NV=NV, STORE_DECAY=store_decay, **scan, **cfg)
    return ds_loc, (seg_decay if store_decay else None)


def _launch_fwd(q, k, v, g, scale, h0, plan: _Plan, accurate_states: bool, segment_states=None):
    """q, k: [NT, H, K]; v: [NT, H, V]; g: None, [H] or [NT, H] float32; h0: None or [N, H, K, V].
    accurate_states: states to ~16 mantissa bits with bf16/fp16 inputs (when dg will be needed).
    segment_states: step 1's result computed earlier by the caller (`SegmentReuse`), or None.
    Returns o [NT, H, V], S_in and S_end per segment [S, H, K, V] and the segments' log-decays [S, H]."""
    H, K, V, NV, S, cfg, meta, scan = _launch_setup(q, v, g, plan, "fwd", accurate_states)
    g_arg = g if g is not None else q
    if plan.max_segs > 1:
        if segment_states is not None:
            s_loc, seg_decay = segment_states
        else:
            s_loc, seg_decay = _launch_segment_state(k, v, g, plan, accurate_states)
        s_in = empty(s_loc, s_loc.shape, s_loc.dtype)
        _scan_segments(s_loc, seg_decay, plan, start=h0, each=s_in, end=None, reverse=False)
    else:
        seg_decay = empty(q, (S, H), torch.float32)
        if h0 is not None:
            s_in = h0.float()[plan.seg_seq].contiguous()
        else:
            s_in = q.new_zeros(S, H, K, V, dtype=torch.float32)
    o = empty(v, v.shape, v.dtype)
    s_end = empty(s_in, s_in.shape, s_in.dtype)
    _fwd_kernel_output[(S, H, NV)](
        q, k, v, g_arg, o, s_in, s_end, seg_decay, plan.seg_bos, plan.seg_eos, scale,
        _loop_bound(plan, scan, scan["BT"]), **scan, **cfg)
    return o, s_in, s_end, seg_decay


def _launch_bwd(q, k, v, g, do, dht, scale, s_in, seg_decay, plan: _Plan, need_dg: bool, need_dh0: bool = True,
                segment_dstates=None):
    """Returns dq, dk, dv (in q's dtype), dL/dB per token [NT, H] (float32), dh0 [N, H, K, V] (None when not
    need_dh0 and no kernel produced it anyway) and dht. dht: the final states' gradient, None, or a function that
    returns it, called once dq's kernel is queued (dq needs only the forward's states: sequence parallelism
    receives dht meanwhile). segment_dstates: step 1's result computed earlier by the caller (`SegmentReuse`), or
    None."""
    NT = q.shape[0]
    H, K, V, NV, S, cfg, meta, scan = _launch_setup(q, v, g, plan, "bwd", need_dg)
    g_arg = g if g is not None else q
    # dv is blocked over V (it sums over K); dk and dq over K (they sum over V), so every program writes
    # finished gradients and only the per-token decay terms are summed over blocks.
    BKK, BVF = _blocks_k(K, V, "bwd")
    NK = cdiv(K, BKK)
    scan_k = dict(scan, BK=BKK, BV=BVF)
    scan_v = {name: value for name, value in scan.items() if name != "SPLIT"}
    dq = empty(q, q.shape, q.dtype)
    qdq = empty(q, (NK, NT, H), torch.float32) if need_dg else dq  # (a tensor the kernel then never touches)
    _bwd_kernel_dq[(S, H, NK)](
        q, k, v, g_arg, do, dq, qdq, s_in, plan.seg_bos, plan.seg_eos, scale,
        _loop_bound(plan, scan), NT, NEED_DG=need_dg, **scan_k, **cfg)
    if callable(dht):
        dht = dht()
    dht = dht.contiguous() if dht is not None else None
    if plan.max_segs > 1:
        if segment_dstates is not None:
            ds_loc = segment_dstates
        else:
            ds_loc, _ = _launch_segment_dstate(q, do, g, scale, plan, need_dg)
        ds_out = empty(ds_loc, ds_loc.shape, ds_loc.dtype)
        dh0 = empty(q, (plan.num_seqs, H, K, V), torch.float32) if need_dh0 else None
        _scan_segments(ds_loc, seg_decay, plan, start=dht, each=ds_out, end=dh0, reverse=True)
    elif dht is not None:
        ds_out = dht.float()[plan.seg_seq].contiguous()
        dh0 = None
    else:
        ds_out = q.new_zeros(S, H, K, V, dtype=torch.float32)
        dh0 = None
    dk = empty(k, k.shape, k.dtype)
    dv = empty(v, v.shape, v.dtype)
    kdk = empty(q, (NK, NT, H), torch.float32) if need_dg else dk
    store_start = dh0 is None and need_dh0  # one segment per sequence: dh0 is dS at the segments' starts
    ds_start = empty(ds_out, ds_out.shape, ds_out.dtype) if store_start else ds_out
    _bwd_kernel_dv[(S, H, NV)](
        q, k, g_arg, do, dv, ds_out, plan.seg_bos, plan.seg_eos, scale,
        _loop_bound(plan, scan), **scan_v, **cfg)
    _bwd_kernel_dk[(S, H, NK)](
        q, k, v, g_arg, do, dk, kdk, ds_out, ds_start, plan.seg_bos, plan.seg_eos, scale,
        _loop_bound(plan, scan), NT, NEED_DG=need_dg, STORE_START=store_start, **scan_k, **cfg)
    if store_start:
        dh0 = ds_start[plan.first_seg_index]
        if dht is not None:
            dh0 = torch.where(plan.nonempty.view(-1, 1, 1, 1), dh0, dht.float())
        else:
            dh0 = dh0 * plan.nonempty.view(-1, 1, 1, 1)
    dlogdecay = qdq.sum(0) - kdk.sum(0) if need_dg else None
    return dq, dk, dv, dlogdecay, dh0, dht


# ----------------------------------------------------------------------------- forward / backward

def chunk_linear_attention_fwd(q, k, v, g, scale, h0, plan: _Plan, accurate_states: bool = False,
                               need_final: bool = True, segment_states=None):
    """Flat inputs (see `_launch_fwd`). Returns o, the final state [N, H, K, V] (None unless need_final)
    and what backward needs."""
    o, s_in, s_end, seg_decay = _launch_fwd(q, k, v, g, scale, h0, plan, accurate_states, segment_states)
    if not need_final:
        return o, None, s_in, seg_decay
    final = s_end[plan.last_seg_index]
    keep = plan.nonempty.view(-1, 1, 1, 1)
    final = torch.where(keep, final, h0.float() if h0 is not None else torch.zeros_like(final))
    return o, final, s_in, seg_decay


def _reverse_cumsum_per_sequence(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """sum_{u >= t, u in t's sequence} x_u for x [NT, H]."""
    total = x.double().flip(0).cumsum(0).flip(0)
    after = torch.cat([total, total.new_zeros(1, x.shape[1])])
    ends = torch.repeat_interleave(plan.seq_ends, plan.lengths, output_size=plan.num_tokens)
    return (total - after[ends]).float()


def chunk_linear_attention_bwd(q, k, v, g, do, dht, scale, s_in, seg_decay, final, plan: _Plan, need_dg: bool,
                               need_dh0: bool = True, segment_dstates=None):
    dq, dk, dv, dlogdecay, dh0, dht = _launch_bwd(q, k, v, g, do, dht, scale, s_in, seg_decay, plan, need_dg, need_dh0,
                                                  segment_dstates)
    dg = None
    if need_dg:
        if dht is not None:
            # The final state depends on B at each sequence's last token through exp(B_last).
            # (Empty sequences add zero at index 0: no boolean indexing, which would wait for the GPU.)
            last_token = (plan.seq_ends - 1).clamp(min=0)
            final_term = (dht.float() * final).sum((-1, -2)) * plan.nonempty[:, None]
            dlogdecay = dlogdecay.index_add(0, last_token, final_term)
        dg = _reverse_cumsum_per_sequence(dlogdecay, plan)
        if g.dim() == 1:
            dg = dg.sum(0)
        # At a restart (g = -inf) the terms of the sum cancel exactly in exact arithmetic (exp(g) = 0 there);
        # set the rounding residue to that 0.
        dg = dg.masked_fill(torch.isneginf(g), 0.0)
    return dq, dk, dv, dg, dh0


def flat_g(g, B: int, T: int, H: int):
    """g as the kernels read it: None, float32 [H] or float32 [B*T, H]."""
    if g is None:
        return None
    return g.float().reshape(B * T, H).contiguous() if g.dim() == 3 else g.float().contiguous()


def _scan_segments(local, seg_decay, plan: _Plan, start, each, end, reverse: bool) -> None:
    """The walk over each sequence's segments (`_kernel_segment_scan`): local [S, H, K, V] with log-decays
    seg_decay [S, H], from start [N, H, K, V] (None: zeros); fills `each` [S, H, K, V] with the state before
    every segment's step and `end` [N, H, K, V] with the state after the last, where given."""
    _, H, K, V = local.shape
    block, num_warps, num_stages = CONFIGS["scan"]
    BLOCK = min(block, next_pow2(K * V))
    cfg = {} if interpreting() else {"num_warps": num_warps, "num_stages": num_stages}
    _kernel_segment_scan[(plan.num_seqs, H, cdiv(K * V, BLOCK))](
        local, seg_decay, each if each is not None else local, start if start is not None else local,
        end if end is not None else local, plan.seq_first_seg, plan.seq_num_segs, plan.max_segs,
        H=H, KV=K * V, BLOCK=BLOCK, HAS_START=start is not None, STORE_EACH=each is not None,
        STORE_END=end is not None, REVERSE=reverse, **cfg)


def fold_segments(local, seg_decay, plan: _Plan, start, reverse: bool):
    """Each row's segment results local [S, H, K, V] (log-decays seg_decay [S, H]) folded in order (a state at
    the row's end) or in reverse (a state gradient at its start), from `start` [B, H, K, V] or zeros; float32
    [B, H, K, V]."""
    _, H, K, V = local.shape
    out = empty(local, (plan.num_seqs, H, K, V), torch.float32)
    start = start.float().contiguous() if start is not None else None
    _scan_segments(local, seg_decay, plan, start=start, each=None, end=out, reverse=reverse)
    return out


class SegmentReuse:
    """Step 1 of the forward and of the backward (every segment's state, every segment's dL/dS_in), computed
    by a caller that needs them before the op runs, and then handed to the op instead of computed twice.

    Sequence parallelism (`lasp_hf.parallel.lasp`) is that caller: before its local pass a rank needs the
    state its tokens produce from a zero start (to send on), and before its local backward the gradient of
    the state it received; both are folds of exactly these per-segment results. Only for dense input whose
    rows the plan cuts into several segments (one segment per row has no step 1). `SegmentReuse.make`
    returns None otherwise. The stored tensors are dropped once the op has used them.
    """

    def __init__(self, plan: _Plan, shape, accurate_states: bool):
        self.plan, self.shape, self.accurate_states = plan, shape, accurate_states
        self.segment_states = None    # (s_loc [S, H, K, V], seg_decay [S, H])
        self.segment_dstates = None   # ds_loc [S, H, K, V]

    @classmethod
    def make(cls, q, k, v, g, accurate_states: bool):
        """For the op's dense inputs q, k [B, T, H, K], v [B, T, H, V]; None where there is nothing to reuse."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        plan = _op_dense_plan(B, T, H, K, V, q.device)  # the very plan the op will use (take_* checks identity)
        return cls(plan, (B, T, H, K, V), accurate_states) if plan.max_segs > 1 else None

    def _g(self, g):
        return flat_g(g, *self.shape[:3])

    def _fold(self, local, seg_decay, start, reverse: bool):
        return fold_segments(local, seg_decay, self.plan, start, reverse)

    @torch.no_grad()
    def prepare_states(self, k, v, g):
        """Compute and keep the segments' states for the op's forward; returns them (s_loc, seg_decay).

        A rank that waits for a state before its local pass calls this first, so the wait overlaps work
        its local pass needs anyway."""
        self.segment_states = _launch_segment_state(_flat_tokens(k), _flat_tokens(v), self._g(g), self.plan,
                                                    self.accurate_states)
        return self.segment_states

    @torch.no_grad()
    def final_state(self, k, v, g, initial_state=None):
        """The state after each row's T tokens from `initial_state` (zeros if None), float32 [B, H, K, V];
        keeps the segments' states for the op's forward."""
        s_loc, seg_decay = self.prepare_states(k, v, g)
        return self._fold(s_loc, seg_decay, initial_state, reverse=False)

    @torch.no_grad()
    def prepare_dstates(self, q, do, g, scale: float):
        """Compute and keep the segments' state gradients for the op's backward (which must then get the
        same do); returns (ds_loc, seg_decay). Like `prepare_states`, for a rank about to wait."""
        ds_loc, seg_decay = _launch_segment_dstate(_flat_tokens(q), _flat_tokens(do.to(q.dtype)), self._g(g), scale,
                                                   self.plan, self.accurate_states, store_decay=True)
        self.segment_dstates = ds_loc
        return ds_loc, seg_decay

    def initial_state_grad(self, q, do, g, scale: float):
        """d sum(o * do) / d initial_state = scale * sum_t exp(G_t) q_t^T do_t, float32 [B, H, K, V]; keeps
        the segments' gradients for the op's backward (which must then get the same do)."""
        ds_loc, seg_decay = self.prepare_dstates(q, do, g, scale)
        with torch.no_grad():
            return self._fold(ds_loc, seg_decay, None, reverse=True)

    def take_states(self, plan: _Plan, accurate_states: bool):
        """The kept segment states if they fit this call of the op (then forgotten), else None."""
        states, self.segment_states = self.segment_states, None
        return states if plan is self.plan and accurate_states == self.accurate_states else None

    def take_dstates(self, plan: _Plan, need_dg: bool):
        dstates, self.segment_dstates = self.segment_dstates, None
        return dstates if plan is self.plan and need_dg == self.accurate_states else None


@dataclass
class LocalPass:
    """What `local_backward` needs besides the saved tensors (returned by `local_forward`)."""

    plan: _Plan
    scale: float
    shape: tuple          # (B, T, H, K, V)
    need_dg: bool
    g_shape: tuple | None
    g_dtype: torch.dtype | None
    h0_dtype: torch.dtype | None
    reuse: SegmentReuse | None


def _plan_for(B: int, T: int, H: int, K: int, V: int, cu_seqlens, device) -> _Plan:
    if cu_seqlens is None:
        return _op_dense_plan(B, T, H, K, V, device)
    return _packed_plan(host_bounds(cu_seqlens), H, _fwd_v_blocks(K, V), device, _planning_knobs())


def local_forward(q, k, v, g=None, *, scale: float, initial_state=None, cu_seqlens=None, need_final=False,
                  need_dg=False, reuse: SegmentReuse | None = None):
    """The forward pass without autograd, for a caller that runs the backward itself (sequence parallelism).

    Arguments as `chunk_linear_attention` (need_final: also return the final state, which a backward with a
    final-state gradient needs for g's gradient; need_dg: the backward will want g's gradient). Returns o
    [B, T, H, V], the final state (or None), the tensors the backward needs (a tuple for `ctx.save_for_backward`)
    and a `LocalPass` for `local_backward`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if reuse is not None and cu_seqlens is not None:
        raise ValueError("reuse (SegmentReuse) is for dense input; got cu_seqlens")
    plan = _plan_for(B, T, H, K, V, cu_seqlens, q.device)
    qf, kf, vf = (_flat_tokens(x) for x in (q, k, v))
    g32 = flat_g(g, B, T, H)
    h0 = initial_state.contiguous() if initial_state is not None else None
    need_dg = need_dg and g is not None
    o, final, s_in, seg_decay = chunk_linear_attention_fwd(
        qf, kf, vf, g32, scale, h0, plan, need_dg, need_final=need_final,
        segment_states=reuse.take_states(plan, need_dg) if reuse is not None else None)
    info = LocalPass(plan, scale, (B, T, H, K, V), need_dg, tuple(g.shape) if g is not None else None,
                     g.dtype if g is not None else None, h0.dtype if h0 is not None else None, reuse)
    return o.view(B, T, H, V), final, (qf, kf, vf, g32, s_in, seg_decay, final), info


def local_backward(saved, info: LocalPass, do, dfinal=None, *, need_dh0: bool = False):
    """The backward of `local_forward` from its saved tensors: (dq, dk, dv, dg, dh0) shaped as the inputs (dg
    None unless need_dg was set; dh0 None unless need_dh0). dfinal: the final state's gradient, None, or a function
    returning either, called once dq's kernel is queued (which needs no dfinal: a caller can receive it meanwhile)."""
    q, k, v, g32, s_in, seg_decay, final = saved
    B, T, H, K, V = info.shape
    dstates = info.reuse.take_dstates(info.plan, info.need_dg) if info.reuse is not None else None
    dq, dk, dv, dg, dh0 = chunk_linear_attention_bwd(
        q, k, v, g32, _flat_tokens(do), dfinal,
        info.scale, s_in, seg_decay, final, info.plan, info.need_dg, need_dh0, dstates)
    if dg is not None:
        dg = dg.reshape(info.g_shape).to(info.g_dtype)
    dh0 = dh0.to(info.h0_dtype) if need_dh0 and dh0 is not None else None
    return dq.view(B, T, H, K), dk.view(B, T, H, K), dv.view(B, T, H, V), dg, dh0


class ChunkLinearAttentionFunction(torch.autograd.Function):
    """`local_forward` / `local_backward` as one autograd node."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, cu_seqlens, output_final_state, reuse=None):
        o, final, saved, info = local_forward(
            q, k, v, g, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens, need_final=output_final_state,
            need_dg=ctx.needs_input_grad[3], reuse=reuse)
        ctx.save_for_backward(*saved)
        ctx.info = info
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        dq, dk, dv, dg, dh0 = local_backward(ctx.saved_tensors, ctx.info, do, dht, need_dh0=ctx.needs_input_grad[4])
        return dq, dk, dv, dg, dh0, None, None, None, None


# ----------------------------------------------------------------------------- public function

def chunk_linear_attention(q, k, v, g=None, *, scale: float, initial_state=None, output_final_state=False,
                           cu_seqlens=None, reuse: SegmentReuse | None = None):
    """Triton backend of `lasp_hf.linear_attention` (inputs already validated by `lasp_hf.ops`).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (float32, bfloat16 or float16; K, V multiples of 16 up to 256).
        g: None, [H] or [B, T, H] natural-log decay (<= 0).
        scale: multiplies q.
        initial_state: None or [B, H, K, V] ([N, H, K, V] with cu_seqlens).
        output_final_state: also return the float32 state after the last token.
        cu_seqlens: None or int [N + 1] with B == 1: packed sequences.
        reuse: per-segment results a caller computed already (`SegmentReuse`; dense input only).
    Returns:
        o [B, T, H, V] in v's dtype, and the final state float32 [B or N, H, K, V] or None.
    """
    return ChunkLinearAttentionFunction.apply(q, k, v, g, initial_state, scale, cu_seqlens, output_final_state, reuse)
