"""Kernel family hadamard_quant."""
