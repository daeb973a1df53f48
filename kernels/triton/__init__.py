"""Triton kernels for linear attention (filled in by the kernels work; see DESIGN.md)."""
