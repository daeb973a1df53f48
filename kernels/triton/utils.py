"""Helpers shared by the Triton kernels' launchers."""

from __future__ import annotations

import os

import torch

# Tests set this to fill every buffer a kernel writes with NaN first, so an element left unwritten shows.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def empty(like: torch.Tensor, shape, dtype) -> torch.Tensor:
    """torch.empty on like's device, NaN-filled when POISON_OUTPUTS is set."""
    x = torch.empty(shape, dtype=dtype, device=like.device)
    return x.fill_(float("nan")) if POISON_OUTPUTS else x
