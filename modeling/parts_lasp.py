"""The parts a linear-attention layer is composed of, each chosen once in `LaspLinearAttention.__init__`:

- q / k activation (`build_qk_activation`): silu (TransNormerLLM), elu + 1 (basic linear attention), identity.
- position encoding (`build_position_encoding`): none, LRPE (TransNormerLLM) or RoPE (fla RetNet), applied to
  q and k at the tokens' GLOBAL positions (the caller passes the positions of the unsharded sequence, so a
  rank under sequence parallelism and a decoding step use their own offsets).
- decay (`decay_kind`): none, a fixed per-head schedule (`fixed_decay`: TransNormerLLM's depth-scaled ALiBi
  slopes or RetNet's log(1 - 2^(-5 - h))), a per-token per-head gate (`GatedHeadDecay`) or a per-token
  per-key-channel gate (`GatedChannelDecay`, GLA).
- output norm (`norm_all_heads` / `norm_per_head`): the norm over the concatenated heads (TransNormer) or over
  each head with one weight shared by the heads (RetNet's group norm as RMSNorm).

- fused projections (`FusedRows`): the weights of several projections of one input stored as
  row blocks of one tensor, so that inference on few rows (decoding) computes them in one matrix product.

Shapes: B batch, T tokens, H heads, D (or K) query/key head dim, V value head dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _elu_plus_one(x):
    return F.elu(x) + 1.0


def _identity(x):
    return x


QK_ACTIVATIONS = {"silu": F.silu, "elu": _elu_plus_one, "identity": _identity}


def build_qk_activation(name: str):
    """The feature map applied to q and k before the position encoding."""
    return QK_ACTIVATIONS[name]


class NoPositionEncoding(nn.Module):
    """q, k unchanged (the decay alone carries order)."""

    def out_dim(self, head_dim: int) -> int:
        return head_dim

    def forward(self, x, position_ids):
        return x


class LinearLrpe(nn.Module):
    """TransNormerLLM's learned relative position encoding (LRPE): x `[B, T, H, D]` at position n ->
    `[x cos(theta n), x sin(theta n)]` `[B, T, H, 2D]`, so q_n . k_m = sum_d q_d k_d cos(theta_d (n - m)).
    theta `[H, D]` is learned, initialized to 10000^(-2 i / (H D)) for i = 0 .. H D - 1. Angles are computed in
    float32 whatever the model's dtype."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.theta = nn.Parameter(self.initial_theta(num_heads, head_dim))

    @staticmethod
    def initial_theta(num_heads: int, head_dim: int) -> torch.Tensor:
        d = num_heads * head_dim
        return (10000.0 ** (-2.0 / d * torch.arange(d, dtype=torch.float32))).view(num_heads, head_dim)

    def out_dim(self, head_dim: int) -> int:
        return 2 * head_dim

    def forward(self, x, position_ids):
        angle = position_ids[:, :, None, None].float() * self.theta.float()  # [B, T, H, D]
        xf = x.float()
        return torch.cat([xf * angle.cos(), xf * angle.sin()], dim=-1).to(x.dtype)


class LinearRotary(nn.Module):
    """Rotary position embedding (rotate-half convention, as fla's RetNet) on q, k `[B, T, H, D]`; cos / sin
    are computed in float32 and rounded to x's dtype, as fla does."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def _apply(self, fn, recurse=True):
        # Keep the frequencies in float32 when the model is cast to a half type.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.inv_freq.float()
        return self

    def out_dim(self, head_dim: int) -> int:
        return head_dim

    def forward(self, x, position_ids):
        freqs = position_ids[:, :, None, None].float() * self.inv_freq.float()  # [B, T, 1, D / 2]
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def build_position_encoding(config, layer_idx: int) -> nn.Module:
    layers = config.position_encoding_layers
    kind = config.position_encoding if layers is None or layer_idx in layers else "none"
    if kind == "lrpe":
        return LinearLrpe(config.num_attention_heads, config.head_dim)
    if kind == "rope":
        return LinearRotary(config.head_dim, config.rope_theta)
    return NoPositionEncoding()


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes for any head count: 2^(-8 (h + 1) / H) for a power of two; otherwise those of the
    largest power of two P below H, then every other slope of 2P (the interleaving of the ALiBi paper, which
    TransNormerLLM uses)."""

    def power_of_two(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    p = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(p) + alibi_slopes(2 * p)[0::2][: num_heads - p]


def _depth_factor(layer_idx: int, num_layers: int) -> float:
    return 1.0 - (layer_idx / (num_layers - 1) if num_layers > 1 else 0.0) + 1e-5


def lightning_decay(config, layer_idx: int) -> torch.Tensor:
    """TransNormerLLM's fixed log decay of layer l of L as lasp-hf has always computed it:
    g_h = -s_h * (1 - l / (L - 1) + 1e-5), s_h = 2^(-8 (h + 1) / H) (ALiBi's slopes when H is a power of
    two). Float32 `[H]`."""
    H = config.num_attention_heads
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32)
    return -slopes * _depth_factor(layer_idx, config.num_hidden_layers)


def fixed_decay(config, layer_idx: int) -> torch.Tensor:
    """The fixed per-head log decay of `config.decay_schedule` (float32 `[H]`):
    "lightning" (`lightning_decay`), "lightning_alibi" (the same depth scaling of ALiBi's slopes for any H, as
    TransNormerLLM's released code), "retnet" (log(1 - 2^(-5 - h)) in every layer)."""
    H = config.num_attention_heads
    schedule = config.decay_schedule or "lightning"
    if schedule == "lightning":
        return lightning_decay(config, layer_idx)
    if schedule == "lightning_alibi":
        # float32 slopes times a Python float, as the released code computes them.
        slopes = torch.tensor(alibi_slopes(H), dtype=torch.float32)
        return -slopes * _depth_factor(layer_idx, config.num_hidden_layers)
    assert schedule == "retnet", schedule
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))).float()


class GatedHeadDecay(nn.Sequential):
    """Per-token, per-head log decay g_t = logsigmoid(W2 W1 x_t + b) / normalizer `[B, T, H]` (float32), from a
    low-rank projection (the "gated" token mixer). A Sequential of the two linears so that saved models keep
    their parameter names (`decay_proj.0.weight`, `decay_proj.1.weight`, `decay_proj.1.bias`)."""

    def __init__(self, hidden_size: int, low_rank_dim: int, num_heads: int, normalizer: float):
        super().__init__(
            nn.Linear(hidden_size, low_rank_dim, bias=False), nn.Linear(low_rank_dim, num_heads, bias=True)
        )
        self.normalizer = normalizer

    def forward(self, x):
        return F.logsigmoid(super().forward(x).float()) / self.normalizer


class GatedChannelDecay(nn.Sequential):
    """Per-token, per-key-channel log decay (GLA): g_t = logsigmoid(W2 W1 x_t + b) / normalizer, `[B, T, H, K]`
    (float32), from a low-rank projection (`decay_proj.0` hidden -> rank without bias, `decay_proj.1` rank ->
    H K with a bias, as fla's `gk_proj`). The op applies it as S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t."""

    def __init__(self, hidden_size: int, low_rank_dim: int, num_heads: int, head_dim: int, normalizer: float):
        super().__init__(
            nn.Linear(hidden_size, low_rank_dim, bias=False),
            nn.Linear(low_rank_dim, num_heads * head_dim, bias=True),
        )
        self.num_heads, self.normalizer = num_heads, normalizer

    def forward(self, x):
        B, T, _ = x.shape
        return (F.logsigmoid(super().forward(x).float()) / self.normalizer).view(B, T, self.num_heads, -1)


def decay_kind(config) -> str:
    """"none", "fixed" (one log decay per head), "gated_head" (per token and head) or "gated_channel" (per token
    and key channel, GLA: the op's `[B, T, H, K]` decay)."""
    if config.token_mixer == "gated":
        return "gated_head"
    if config.token_mixer == "gla":
        return "gated_channel"
    if config.token_mixer == "lightning" and config.decay_schedule != "none":
        return "fixed"
    return "none"


DECAY_KINDS = ("none", "fixed", "gated_head", "gated_channel")


def norm_all_heads(norm: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """o `[B, T, H, V]` -> norm over all H V channels -> `[B, T, H V]`."""
    B, T = o.shape[:2]
    return norm(o.reshape(B, T, -1))


def norm_per_head(norm: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """o `[B, T, H, V]` -> norm over each head's V channels (one weight shared by the heads) -> `[B, T, H V]`."""
    B, T = o.shape[:2]
    return norm(o).reshape(B, T, -1)


OUTPUT_NORMS = {"all_heads": norm_all_heads, "per_head": norm_per_head}


# The most rows (tokens of all sequences) of x that `FusedRows.project` computes as one product. A product of
# few rows (a decoding step) is bound by reading its weights and by launches: one product per group is faster
# (1.18x per tnl-1b graph step at B = 1). A product of M rows does about M FLOP per weight byte, and an H100's bf16
# products turn compute-bound at a few hundred: past that one product gains nothing, while its views keep the
# whole `[rows, sum of outputs]` product alive as long as any one of them lives (the cache's rollback window keeps
# v: a 16K-token prefill chunk of tnl-1b kept its q, k and gate too, 3.2 GB over 16 layers).
MAX_FUSED_ROWS = 256


class FusedRows:
    """Several bias-free projections of one input (the `nn.Linear` submodules `names` of `owner`, of one dtype,
    device and input width), computed by inference on at most `MAX_FUSED_ROWS` rows as one matrix product (more
    rows: one product each, as unfused): `fuse()` stores their weights as consecutive row blocks of one new
    tensor, each weight's data a view of it (the same parameters, values and state dict; no memory added, the
    separate tensors are freed), and `weight()` returns that block. A cast or move of the model makes separate
    tensors again (the owner calls `reset()` from `_apply`), after which `weight()` is None until the next
    `fuse()`. The submodules are looked up on every call: where one has been replaced by anything but a plain
    bias-free `nn.Linear` (a PEFT adapter's wrapper, a quantized linear), there is no block and each projection
    runs as its own module."""

    def __init__(self, owner: nn.Module, *names: str):
        self.owner, self.names = owner, names
        self.reset()

    @property
    def linears(self) -> list[nn.Module]:
        return [getattr(self.owner, name) for name in self.names]

    def _plain_linears(self) -> list[nn.Linear] | None:
        linears = self.linears
        if all(type(m) is nn.Linear and m.bias is None for m in linears):
            return linears
        return None

    def reset(self) -> None:
        self._key, self._block, self._sizes = None, None, None

    def fuse(self) -> bool:
        """Lay the weights out as one block (if they are not already); False where they differ in dtype, device
        or input width, or are not plain tensors with memory of their full shape (sharded DTensors of FSDP2, meta
        tensors, ZeRO-3 placeholders): they stay as they are."""
        linears = self._plain_linears()
        if linears is None:
            return False
        weights = [linear.weight for linear in linears]
        first = weights[0]
        if any(type(w.data) is not torch.Tensor or w.device.type == "meta" or w.shape != (m.out_features, m.in_features)
               for m, w in zip(linears, weights, strict=True)):
            return False  # also a partitioned weight (DeepSpeed ZeRO-3 leaves an empty placeholder)
        if any(w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1] for w in weights):
            return False
        if _row_block(weights) is None:
            # A normal tensor even when called under inference mode: the parameters stay usable for training.
            with torch.no_grad(), torch.inference_mode(False):
                fused = torch.cat([w.detach() for w in weights])
                start = 0
                for linear, w in zip(linears, weights, strict=True):
                    linear.weight.data = fused[start : start + w.shape[0]]
                    start += w.shape[0]
        self.reset()
        return True

    def unfuse(self) -> None:
        """Give each weight its own tensor again (a copy of its rows; the block is freed once nothing else holds
        it)."""
        linears = self._plain_linears()
        if linears is None or _row_block([linear.weight for linear in linears]) is None:
            return
        with torch.no_grad(), torch.inference_mode(False):
            for linear in linears:
                linear.weight.data = linear.weight.detach().clone()
        self.reset()

    def weight(self) -> torch.Tensor | None:
        """The weights as one `[sum of out, in]` tensor when they are laid out so and no gradient to them is
        wanted (autograd must reach each parameter), else None: the caller then takes one product per
        projection. Host metadata only (pointers; the block's view is kept while they stay the same). None
        while torch.compile or torch.export traces (their tensors have no addresses)."""
        if torch.compiler.is_compiling():
            return None
        linears = self._plain_linears()
        if linears is None:
            return None
        weights = [linear.weight for linear in linears]
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return None
        # The kept view holds its storage, so equal addresses are that storage (no other tensor can take them).
        key = (weights[0].dtype, *(w.data_ptr() for w in weights))
        if key != self._key:
            self._key, self._block = key, _row_block(weights)
            self._sizes = [w.shape[0] for w in weights]
        return self._block

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Each projection of x (`[..., in]`), as views of one product, when `weight()` gives the block and x has
        at most `MAX_FUSED_ROWS` rows; else None (the caller takes one product per projection)."""
        if x.numel() > MAX_FUSED_ROWS * x.shape[-1]:
            return None  # (before `weight()`: a prompt never needs the block)
        weight = self.weight()
        if weight is None:
            return None
        return F.linear(x, weight).split(self._sizes, dim=-1)


def _row_block(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The weights as one `[sum of rows, in]` view when they are consecutive, contiguous row blocks of one
    storage, else None. Host metadata only (pointers and shapes)."""
    first = weights[0]
    if any(w.dim() != 2 for w in weights):
        return None
    width, size = first.shape[1], first.element_size()
    storage, at, rows = first.untyped_storage().data_ptr(), first.data_ptr(), 0
    for w in weights:
        if (w.data_ptr() != at or not w.is_contiguous() or w.dtype != first.dtype or w.shape[1] != width
                or w.untyped_storage().data_ptr() != storage):
            return None
        at += w.numel() * size
        rows += w.shape[0]
    return first.detach().as_strided((rows, width), (width, 1))


__all__ = [
    "DECAY_KINDS",
    "FusedRows",
    "GatedChannelDecay",
    "GatedHeadDecay",
    "LinearLrpe",
    "LinearRotary",
    "MAX_FUSED_ROWS",
    "NoPositionEncoding",
    "OUTPUT_NORMS",
    "QK_ACTIVATIONS",
    "alibi_slopes",
    "build_position_encoding",
    "build_qk_activation",
    "decay_kind",
    "fixed_decay",
    "lightning_decay",
    "norm_all_heads",
    "norm_per_head",
]
