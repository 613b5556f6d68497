"""`slimc::` custom ops (importing this package registers all of them) and their helpers."""

from __future__ import annotations

from slimc.ops import experts, fp8, fused, linear, packing, quant, rotate
from slimc.ops.linear import dequantize_weight, int8_matmul
from slimc.ops.packing import pack_int4, unpack_int4
from slimc.ops.quant import block_grid_shape, expand_blocks, resolve_block_size

__all__ = [
    "experts",
    "fp8",
    "fused",
    "linear",
    "packing",
    "quant",
    "rotate",
    "block_grid_shape",
    "dequantize_weight",
    "expand_blocks",
    "int8_matmul",
    "pack_int4",
    "resolve_block_size",
    "unpack_int4",
]
