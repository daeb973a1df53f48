"""Helpers shared by the Triton kernels' launchers."""

from __future__ import annotations

import os

import torch

# Tests set this to fill every buffer a kernel writes with NaN first, so an element left unwritten shows.
POISON_OUTPUTS = False


# Read once, as Triton itself decides at import whether its JIT functions are interpreted.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1 at import, CPU tensors)."""
    return _INTERPRETING


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers (`triton.cdiv` is a constexpr function: microseconds per host call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), like `triton.next_power_of_2` without its call overhead."""
    return 1 << (n - 1).bit_length()


def empty(like: torch.Tensor, shape, dtype) -> torch.Tensor:
    """torch.empty on like's device, NaN-filled when POISON_OUTPUTS is set."""
    x = torch.empty(shape, dtype=dtype, device=like.device)
    return x.fill_(float("nan")) if POISON_OUTPUTS else x
