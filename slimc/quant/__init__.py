"""Quantization schemes, observers and the weight quantizers passes call."""
