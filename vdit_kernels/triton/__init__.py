"""Triton kernels, one module per op family (vdit_kernels.backend imports them on first use)."""
