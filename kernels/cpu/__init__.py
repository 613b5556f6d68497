"""Kernel family cpu: quantized linears on PyTorch's native int8 / int4 CPU kernels.

Importing this package registers the `slimc::cpu_linear_*` kernel ops (see `ops`); the
`lower-cpu` pass binds fused linears to them.
"""

from __future__ import annotations

from slimc.kernels.cpu import ops
from slimc.kernels.cpu.ops import INT4_GROUPS, int4_group_for, prepare_int4

__all__ = ["INT4_GROUPS", "int4_group_for", "ops", "prepare_int4"]
