"""Building blocks of the lasp model family: norms, the GLU channel mixer, the linear-attention token mixer
(lightning / linear / gated / gla, composed of the parts in `parts_lasp`) and the softmax-attention token mixer with
rotary embeddings (hybrid layers).

Shapes: B batch, T tokens (this call), H heads, D head dim, V value head dim.
"""

from collections.abc import Callable
from functools import partial
from itertools import pairwise

import torch
import torch.nn.functional as F
from lasp_hf.kernels.host import host_bounds
from lasp_hf.ops import linear_attention, linear_attention_step, resolve_backend
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_lasp import LaspConfig
from .parts_lasp import (
    OUTPUT_NORMS,
    FusedRows,
    GatedChannelDecay,
    GatedHeadDecay,
    NoPositionEncoding,
    build_position_encoding,
    build_qk_activation,
    decay_kind,
    fixed_decay,
    lightning_decay,
)


def _rms_normalize(x, eps: float):
    """x / rms(x) over the last axis, computed in float32 and returned in x's dtype: one fused kernel on CUDA
    (`F.rms_norm`), outside autocast so that a bf16 input stays bf16."""
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, (x.shape[-1],), eps=eps)


class LaspRMSNorm(nn.Module):
    """RMSNorm with a learned weight (normalized in float32, rounded to the input's dtype, times the weight)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * _rms_normalize(x, self.eps)


class LaspSRMSNorm(nn.Module):
    """TransNormerLLM's simple RMSNorm: x / rms(x), no weight (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x):
        return _rms_normalize(x, self.eps)


def build_norm(config: LaspConfig, dim: int) -> nn.Module:
    norm_class = LaspRMSNorm if config.norm_type == "rmsnorm" else LaspSRMSNorm
    return norm_class(dim, eps=config.rms_norm_eps)


# The fused decoding step (`lasp_hf.kernels.triton.decode`): "auto" on CUDA tensors when Triton imports, "always"
# wherever the Triton kernels run (also in the interpreter, for tests), "never" (the layers' plain PyTorch code).
# Off by default: on one H100 (tnl-1b, 32K, B = 1) its CUDA-graph step took 1.530 ms/token against the plain
# step's 1.516 (benchmarks/results/generate-h100-86ef9e0.md; `generate_speed.py --plain-graph` compares them), and
# eager decoding, bound by host time, spends more Python per block in it.
FUSED_DECODE = "never"


def fused_decode_applies(x: torch.Tensor, cache, sp_context, weight: torch.Tensor) -> bool:
    """Whether a block's call on x `[B, T, hidden]` is a decoding step that the fused kernels take: one token per
    row, a cache, no gradients, no autocast, no SP group, x and the weights of one dtype."""
    if FUSED_DECODE == "never" or x.shape[1] != 1 or cache is None or sp_context is not None:
        return False
    if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype:
        return False
    if FUSED_DECODE == "auto" and (x.device.type != "cuda" or resolve_backend("auto", x.device) != "triton"):
        return False
    return True


def fused_linear(*args, **kwargs):
    """`lasp_hf.kernels.triton.decode.fused_linear`, imported on first use (Triton is needed only there)."""
    from lasp_hf.kernels.triton.decode import fused_linear as kernel

    return kernel(*args, **kwargs)


def fused_norm_group_ok(group: int) -> bool:
    """Whether fused_linear normalizes groups of this many features one block at a time (a per-head output norm):
    a power of two up to `decode.MAX_NORM_GROUP`."""
    from lasp_hf.kernels.triton.decode import MAX_NORM_GROUP

    return group & (group - 1) == 0 and group <= MAX_NORM_GROUP


def _norm_args(norm: nn.Module, dtype) -> dict | None:
    """fused_linear's prologue of a LaspRMSNorm / LaspSRMSNorm (eps, weight), or None when its weight is of another
    dtype than the input (eager PyTorch would promote the product: the plain path keeps that)."""
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.dtype != dtype:
        return None
    return {"norm_eps": norm.eps, "norm_weight": weight}


class LaspGLU(nn.Module):
    """Channel mixer: `down(act(gate(x)) * up(x))`, act = identity (SGLU, TransNormerLLM) or SiLU (SwiGLU)."""

    def __init__(self, config: LaspConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = nn.SiLU() if config.channel_mixer == "swiglu" else nn.Identity()
        self.gate_up = FusedRows(self, "gate_proj", "up_proj")  # one product at inference, after `fuse()`

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.gate_up.reset()  # a cast or move makes new weights: drop the view of the old ones
        return self

    def forward(self, x):
        gate_up = self.gate_up.project(x)
        gate, up = gate_up if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)

    def decode_step(self, x, norm: nn.Module):
        """x + forward(norm(x)) for one token per row, x `[B, 1, hidden]`, in two fused launches (norm, both
        projections, activation and product; down projection and residual), or None when the norm's weight has
        another dtype than x."""
        norm_args = _norm_args(norm, x.dtype)
        if norm_args is None:
            return None
        x2 = x.reshape(x.shape[0], -1)
        act = "silu" if isinstance(self.act, nn.SiLU) else "identity"
        (h,) = fused_linear(x2, [self.gate_proj.weight, self.up_proj.weight], acts=[act, "identity"], glu=True,
                            **norm_args)
        (out,) = fused_linear(h, [self.down_proj.weight], residual=x2)
        return out.view_as(x)


def chunked_over_tokens(fn: Callable, chunk_size: int, *inputs: torch.Tensor | None):
    """`fn(*inputs)` for a per-token `fn`, computed on slices of at most `chunk_size` tokens of the inputs
    `[B, T, ...]` (None passes through as None) and concatenated on the token axis; fn returns a tensor or a
    tuple of tensors / None. With gradients on, each slice runs under a non-reentrant checkpoint: fn's
    intermediates exist for one slice at a time, in the forward and again when the backward recomputes them.

    The slices come from one `split` per input, whose backward concatenates their gradients once (slicing with
    indices would add a full-size `[B, T, ...]` zero-padded gradient per slice).
    """
    T = next(x.shape[1] for x in inputs if x is not None)
    pieces = zip(
        *(x.split(chunk_size, dim=1) if x is not None else [None] * -(-T // chunk_size) for x in inputs),
        strict=True,
    )
    grad = torch.is_grad_enabled()
    outs = [checkpoint(fn, *piece, use_reentrant=False) if grad else fn(*piece) for piece in pieces]
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs, dim=1)
    # One output at a time, its slices dropped once joined: at most one output exists twice (slices + whole).
    parts = [list(part) for part in zip(*outs, strict=True)]
    del outs
    joined = []
    for i, part in enumerate(parts):
        joined.append(None if part[0] is None else torch.cat(part, dim=1))
        parts[i] = None
    return tuple(joined)


# The widest value head the Triton kernels take in one call. The op is separable along V (each column of the state
# and of the output depends on that column of v alone), so wider heads (fla RetNet's 512) run as several calls.
MAX_VALUE_BLOCK = 256


def in_value_blocks(attend: Callable, v: torch.Tensor, state: torch.Tensor | None, width: int):
    """`attend(v, state) -> (o, final_state)` on column blocks of at most `width` value channels of v `[B, T, H,
    V]` and of the state `[B, H, K, V]`, the results joined along V: exact, since linear attention treats every
    value channel on its own."""
    if v.shape[-1] <= width:
        return attend(v, state)
    outs, states = [], []
    for start in range(0, v.shape[-1], width):
        o, final = attend(v[..., start:start + width], None if state is None else state[..., start:start + width])
        outs.append(o)
        states.append(final)
    return torch.cat(outs, dim=-1), None if states[0] is None else torch.cat(states, dim=-1)


class LaspLinearAttention(nn.Module):
    """Linear-attention token mixer, composed of parts chosen once here (see `parts_lasp`):

        q, k = position(act(W_q x)), position(act(W_k x));  v = W_v x;  g = decay
        o = linear_attention(q, k, v, g, scale);  out = o_proj(gate(W_u x) * output_norm(o))

    `config.token_mixer` picks the defaults of each part, and the other fields override them:
    - "lightning" (TransNormerLLM): act silu; fixed per-head decay (`config.decay_schedule`); scale 1; output
      gate. With LRPE on some layers, ALiBi slopes for any head count and an identity gate it is the released
      TransNormerLLM; with RoPE, the RetNet schedule, scale D^-0.5, no activation, values 2D wide, a per-head
      output norm and a silu gate it is fla's RetNet.
    - "linear" (the LASP paper's basic linear attention): act = feature map (elu + 1 or identity); no decay;
      scale D^-0.5; no gate.
    - "gated" (gated linear attention): g_t = logsigmoid(W2 W1 x_t + b) / normalizer per token and head;
      scale D^-0.5; output gate.
    - "gla" (GLA, Yang et al. 2023, as fla's `GatedLinearAttention`): the same low-rank gate per token and key
      channel, g_t `[B, T, H, D]`, S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t; no q / k activation; scale
      D^-0.5; output gate. With value_head_dim 2D, a per-head RMSNorm output norm with a learned weight and a
      silu (swish) gate it is fla's GLA layer.

    The output norm stands in for linear attention's denominator, as in TransNormer, and keeps the unnormalized
    sum of outer products in range. Positions (`position_ids`, the tokens' global positions) matter only to a
    position encoding.

    Padding (`mask` False): k and v are zeroed and g set to 0 there, so a padded token neither adds to the
    state nor decays it. Left pads keep the state exactly zero until the first real token; right pads leave
    it (and the cached state) equal to the state after the last real token.

    With `config.attention_chunk_size` set (training at long T): the token-wise parts before the op (input
    norm, projections, feature maps, position encoding, masking, decay projection) and after it (output norm,
    gate, o_proj) run over the token axis in checkpointed chunks (`chunked_over_tokens`), so for the backward
    the block keeps only its input, q, k, v (and g), which the op keeps anyway, and the op's output o. The op
    itself runs on all T tokens (of this rank) at once.
    """

    def __init__(self, config: LaspConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kind = config.token_mixer
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.value_head_dim = getattr(config, "value_head_dim", None) or config.head_dim
        width, v_width = self.num_heads * self.head_dim, self.num_heads * self.value_head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, v_width, bias=False)

        default_act = {"lightning": "silu", "linear": config.feature_map, "gated": "identity", "gla": "identity"}
        qk_act = getattr(config, "qk_activation", None) or default_act[self.kind]
        self.qk_act = build_qk_activation(qk_act)
        self.position = build_position_encoding(config, layer_idx)

        output_norm = getattr(config, "output_norm", "all_heads")
        self.o_norm = build_norm(config, v_width if output_norm == "all_heads" else self.value_head_dim)
        self.normalize_output = OUTPUT_NORMS[output_norm]
        self.o_proj = nn.Linear(v_width, config.hidden_size, bias=False)
        self.u_proj = None
        if self.kind in ("lightning", "gated", "gla"):
            self.u_proj = nn.Linear(config.hidden_size, v_width, bias=False)
            self.u_act = {"sigmoid": nn.Sigmoid, "silu": nn.SiLU, "identity": nn.Identity}[
                config.output_gate_act
            ]()
        # q / k / v (and the gate's) projections as one product at inference, after `fuse()`.
        self.qkvu = FusedRows(self, "q_proj", "k_proj", "v_proj", *(["u_proj"] if self.u_proj is not None else []))
        # The activations of q, k, v (and the gate) by their names in the fused decoding step (`decode_step`).
        fused_qk_act = {"elu": "elu_plus_one"}.get(qk_act, qk_act)
        self._fused_acts = [fused_qk_act, fused_qk_act, "identity"] + (
            [config.output_gate_act] if self.u_proj is not None else []
        )
        self._fused_norm_group = None if output_norm == "all_heads" else self.value_head_dim  # None: the whole row
        # Created after the projections, as before the layer was split into parts, so that a seeded model
        # draws the same initial weights.
        kind = decay_kind(config)
        self.decay_proj = None
        if kind == "gated_head":
            self.decay_proj = GatedHeadDecay(
                config.hidden_size, config.gate_low_rank_dim, self.num_heads, config.gate_logit_normalizer
            )
        if kind == "gated_channel":
            self.decay_proj = GatedChannelDecay(
                config.hidden_size,
                config.gate_low_rank_dim,
                self.num_heads,
                self.head_dim,
                config.gate_logit_normalizer,
            )
        if kind == "fixed":
            self.register_buffer("decay", fixed_decay(config, layer_idx), persistent=False)
        else:
            self.decay = None
        scale = getattr(config, "attention_scale", None)
        if scale is None:
            scale = 1.0 if self.kind == "lightning" else self.head_dim**-0.5
        self.scale = scale

    def _apply(self, fn, recurse=True):
        # Keep the fixed decay in float32 when the model is cast to bf16 / fp16 (bf16 would round it by 2^-9).
        super()._apply(fn, recurse)
        if self.decay is not None and self.decay.dtype != torch.float32:
            self.decay = self.decay.float()
        self.qkvu.reset()  # a cast or move makes new weights: drop the view of the old ones
        return self

    def _chunk_size(self, T: int) -> int | None:
        """Tokens per chunk of the token-wise parts, or None to run them whole: chunks only pay off (and only
        run) while gradients are on and T exceeds the chunk, so generation and decode steps never chunk."""
        # Read here, not in __init__: it may be set after loading.
        chunk_size = getattr(self.config, "attention_chunk_size", None)
        if chunk_size is None or not torch.is_grad_enabled() or T <= chunk_size:
            return None
        return chunk_size

    def _project(self, x, mask, position_ids, input_norm=None):
        """The token-wise part before the op: q, k `[B, T, H, D']` after the activation and position encoding
        (D' = 2D with LRPE), v `[B, T, H, V]`, the per-token log decay (`[B, T, H]` of the "gated" kind,
        `[B, T, H, D]` of "gla", else None), k, v (and g) zeroed at padding (mask False), and the output gate's
        projection `[B, T, H * V]` when the fused projections computed it (else None: `_output` does)."""
        if input_norm is not None:
            x = input_norm(x)
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, -1)
        projected, u = self.qkvu.project(x), None
        if projected is not None:
            q, k, v, *rest = projected
            u = rest[0] if rest else None
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.position(self.qk_act(q.view(shape)), position_ids)
        k = self.position(self.qk_act(k.view(shape)), position_ids)
        v = v.view(shape)
        g = self.decay_proj(x) if self.decay_proj is not None else None
        if mask is not None:
            pad = ~mask[:, :, None]  # [B, T, 1]
            k = k.masked_fill(pad[..., None], 0.0)
            v = v.masked_fill(pad[..., None], 0.0)
            if g is not None:
                g = g.masked_fill(pad if g.dim() == 3 else pad[..., None], 0.0)
        return q, k, v, g, u

    def _output(self, o, x, input_norm=None, u=None):
        """The token-wise part after the op: o `[B, T, H, V]` -> output norm, times the output gate of x (the
        block input, normed by input_norm if given; u its projection where `_project` computed it) when the
        kind has one, -> o_proj `[B, T, hidden]`."""
        o = self.normalize_output(self.o_norm, o)
        if self.u_proj is not None:
            if u is None:
                x = input_norm(x) if input_norm is not None else x
                u = self.u_proj(x)
            o = self.u_act(u) * o
        return self.o_proj(o)

    def _step(self, q, k, v, g, state, inplace: bool):
        """The op's decoding step on one token per row, q, k `[B, 1, H, D']`, v `[B, 1, H, V]`."""
        # A per-token decay ([B, 1, H] or [B, 1, H, D]) loses its token axis; a fixed one is [H].
        g_step = g[:, 0] if (g is not None and g.dim() >= 3) else g
        o, new_state = linear_attention_step(
            q[:, 0], k[:, 0], v[:, 0], g_step, state=state, scale=self.scale, inplace=inplace
        )
        return o[:, None], new_state

    def decode_step(self, x, input_norm: nn.Module, cache, position_ids=None, mask=None):
        """x plus this mixer's output for one token per row, x `[B, 1, hidden]` (the block input; input_norm the
        block's norm), in three launches: the fused norm and q / k / v / gate projections with their
        activations, the op's step, the fused output norm, gate, o_proj and residual (`fused_linear`). The same
        arithmetic as `forward`, rounded where it rounds; a gated decay's projection reads the normed x, which
        then runs on its own. None when a norm's weight has another dtype than x (the plain path then runs)."""
        B = x.shape[0]
        in_norm, out_norm = _norm_args(input_norm, x.dtype), _norm_args(self.o_norm, x.dtype)
        group = self._fused_norm_group
        if in_norm is None or out_norm is None or (group is not None and not fused_norm_group_ok(group)):
            return None
        x2 = x.reshape(B, -1)
        weights = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        if self.u_proj is not None:
            weights.append(self.u_proj.weight)
        acts = self._fused_acts
        g = None
        if self.decay_proj is not None:
            normed = input_norm(x)
            g = self.decay_proj(normed)
            outputs = fused_linear(normed.reshape(B, -1), weights, acts=acts)
        else:
            outputs = fused_linear(x2, weights, acts=acts, **in_norm)
        shape = (B, 1, self.num_heads, -1)
        q, k = (self.position(t.view(shape), position_ids) for t in outputs[:2])
        v = outputs[2].view(shape)
        if self.decay is not None:
            g = self.decay if mask is None else self.decay.expand(B, 1, self.num_heads)
        if mask is not None:  # as `_project` and `forward`: a padded token neither adds to the state nor decays it
            pad = ~mask[:, :, None]
            k, v = k.masked_fill(pad[..., None], 0.0), v.masked_fill(pad[..., None], 0.0)
            if g is not None:
                g = g.masked_fill(pad if g.dim() == 3 else pad[..., None], 0.0)
        inplace = getattr(cache, "steps_in_place", False) and v.shape[-1] <= MAX_VALUE_BLOCK
        o, new_state = in_value_blocks(
            lambda v, state: self._step(q, k, v, g, state, inplace), v, cache.get_state(self.layer_idx),
            MAX_VALUE_BLOCK,
        )
        cache.set_state(new_state, self.layer_idx, k, v, g)
        gate = outputs[3] if self.u_proj is not None else None
        (out,) = fused_linear(o.reshape(B, -1), [self.o_proj.weight], gate=gate, residual=x2, norm_group=group,
                              **out_norm)
        return out.view_as(x)

    def forward(
        self,
        hidden_states,
        mask=None,
        cu_seqlens=None,
        cache=None,
        sp_context=None,
        input_norm=None,
        position_ids=None,
        **kwargs,
    ):
        """hidden_states `[B, T, hidden]`, normed already, or the block input when `input_norm` (the block's
        norm) is given: the norm then runs here, inside the chunks of `config.attention_chunk_size` when those
        are on, so no normed copy of all T tokens is kept for the backward. position_ids `[B, T]`: the tokens'
        global positions (needed by a position encoding; the model always passes them)."""
        B, T, _ = hidden_states.shape
        if position_ids is None and not isinstance(self.position, NoPositionEncoding):
            raise ValueError("a linear-attention layer with a position encoding needs position_ids [B, T]")
        chunk_size = self._chunk_size(T)
        if chunk_size is None and input_norm is not None:
            hidden_states, input_norm = input_norm(hidden_states), None
        if chunk_size is None:
            q, k, v, g, u = self._project(hidden_states, mask, position_ids, input_norm)
        else:
            project = partial(self._project, input_norm=input_norm)
            # (The chunks' gate projections, where computed, are not kept: `_output`'s chunks form their own.)
            q, k, v, g, _ = chunked_over_tokens(project, chunk_size, hidden_states, mask, position_ids)
        if self.decay is not None:
            g = self.decay.float()
            if mask is not None:
                g = g.expand(B, T, self.num_heads).masked_fill(~mask[:, :, None], 0.0)

        state = cache.get_state(self.layer_idx) if cache is not None else None
        # A cache of fixed state buffers (the graph decoder's) takes the step's state in place, in one block.
        inplace = getattr(cache, "steps_in_place", False) and v.shape[-1] <= MAX_VALUE_BLOCK

        def attend(v, state):
            if state is not None and T == 1:
                return self._step(q, k, v, g, state, inplace)  # one decoding token: O(1) in the context length
            return linear_attention(
                q,
                k,
                v,
                g,
                scale=self.scale,
                initial_state=state,
                output_final_state=cache is not None,
                cu_seqlens=cu_seqlens,
                sp_group=sp_context,
                sp_mode=sp_context.mode if sp_context is not None else "ring",
            )

        o, new_state = in_value_blocks(attend, v, state, MAX_VALUE_BLOCK)
        if cache is not None:
            # k, v, g let the cache roll the state back into this call (assisted decoding crops rejected tokens).
            cache.set_state(new_state, self.layer_idx, k, v, g)

        gate_input = hidden_states if self.u_proj is not None else None
        if chunk_size is None:
            return self._output(o, gate_input, input_norm, u)
        return chunked_over_tokens(partial(self._output, input_norm=input_norm), chunk_size, o, gate_input)


class LaspRotaryEmbedding(nn.Module):
    """Rotary position embeddings (rotate-half convention) for the full-attention layers."""

    def __init__(self, config: LaspConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.compute_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the frequencies in float32 when the model is cast to a half type.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.inv_freq.float()
        return self

    @staticmethod
    def compute_inv_freq(config: LaspConfig) -> torch.Tensor:
        dim = config.head_dim
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    @torch.no_grad()
    def forward(self, x, position_ids):
        """position_ids `[B, T]` -> cos, sin `[B, T, D]` in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q, k `[B, T, H, D]`; cos, sin `[B, T, D]`."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention in plain PyTorch. query `[B, H, Tq, D]`, key/value `[B, H, Tk, D]`; attention_mask is
    None (causal, queries aligned to the last keys) or boolean `[B, 1, Tq, Tk]` (True = attend)."""
    weights = (query @ key.transpose(2, 3)) * scaling
    Tq, Tk = query.shape[2], key.shape[2]
    if attention_mask is None and Tq > 1:
        attention_mask = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(diagonal=Tk - Tq)
    if attention_mask is not None:
        weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
    probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


class LaspSoftmaxAttention(nn.Module):
    """Causal softmax attention with RoPE for the "full_attention" layers of hybrids, through transformers'
    attention interface (sdpa by default, eager as fallback). Under SP it calls `sp_softmax_attention`."""

    def __init__(self, config: LaspConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = 1
        self.is_causal = True
        self.scaling = self.head_dim**-0.5
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)

    def _attention_interface(self) -> Callable:
        implementation = self.config._attn_implementation
        if implementation in (None, "eager"):
            return eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS[implementation]

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attn_mask=None,
        cu_seqlens=None,
        cache=None,
        sp_context=None,
        output_attentions=False,
        **kwargs,
    ):
        """Returns the output `[B, T, hidden]` and the attention weights `[B, H, T, P + T]` when
        `output_attentions` (computed eagerly, whatever the attention implementation; None under sequence
        parallelism and for packed documents, where no single matrix exists), else None."""
        B, T, _ = hidden_states.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)

        if sp_context is not None:
            from lasp_hf.parallel.attention import sp_softmax_attention

            o, (k_all, v_all) = sp_softmax_attention(
                q,
                k,
                v,
                sp_context=sp_context,
                cu_seqlens=cu_seqlens,
                scale=self.scaling,
                return_gathered_kv=True,
            )
            if cache is not None:
                # A prefill under SP: every rank keeps the whole prompt's keys / values for decoding.
                cache.update(k_all.transpose(1, 2), v_all.transpose(1, 2), self.layer_idx)
            return self.o_proj(o.reshape(B, T, -1)), None

        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = self._attention_interface()
        weights = None
        if output_attentions and cu_seqlens is None:
            # Only the eager path materializes the weights (sdpa and the kernels never do).
            attention = eager_attention_forward
        if cu_seqlens is not None:
            # Packed documents: one causal call per document, so none attends across a boundary.
            bounds = host_bounds(cu_seqlens)
            outs = [
                attention(
                    self, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, dropout=0.0, scaling=self.scaling
                )[0]
                for s, e in pairwise(bounds)
                if e > s
            ]
            o = torch.cat(outs, dim=1)
        else:
            o, weights = attention(self, q, k, v, attn_mask, dropout=0.0, scaling=self.scaling)
        return self.o_proj(o.reshape(B, T, -1)), (weights if output_attentions else None)


__all__ = [
    "LaspGLU",
    "LaspLinearAttention",
    "LaspRMSNorm",
    "LaspRotaryEmbedding",
    "LaspSRMSNorm",
    "LaspSoftmaxAttention",
    "build_norm",
    "chunked_over_tokens",
    "fixed_decay",
    "lightning_decay",
]
