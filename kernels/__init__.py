"""Triton kernels for the experts op (see lowering/triton.py)."""
