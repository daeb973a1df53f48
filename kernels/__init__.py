"""Compute kernels of lasp_hf: the PyTorch reference (`reference`) and the Triton kernels (`triton`)."""

from lasp_hf.kernels import reference

__all__ = ["reference"]
