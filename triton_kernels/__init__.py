"""Triton kernels of mem1_fast (installed as mem1_fast.triton_kernels)."""
