"""Kernel family fp8."""
