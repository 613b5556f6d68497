"""Signed int4 <-> packed uint8 nibble packing (two values per byte along the last dim)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_int4", "unpack_int4"]

_INT4_OFFSET = 8


def pack_int4(q: Tensor) -> Tensor:
    """Pack int4 values [..., K] (int8 storage, in [-8, 7]) into uint8 [..., K // 2].

    Each value is stored as the unsigned nibble u = q + 8; byte j holds k = 2j in its low
    nibble and k = 2j + 1 in its high nibble.

    Raises:
        ValueError: the last dim is odd, the tensor is 0-d, or a value lies outside [-8, 7].
    """
    if q.dim() == 0 or q.shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4 needs an even last dim, got shape {tuple(q.shape)}")
    if q.is_floating_point() or q.dtype == torch.bool:
        raise ValueError(f"pack_int4 expects an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    u = (q.to(torch.int16) + _INT4_OFFSET).to(torch.uint8)
    low = u[..., 0::2]
    high = u[..., 1::2]
    return (low | (high << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: uint8 [..., K // 2] -> int8 [..., K] in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8, got {packed.dtype}")
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    out = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return out - _INT4_OFFSET
