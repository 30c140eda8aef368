"""Fused GPU kernels (Triton). The CPU path never imports them."""
