"""Rounding weights to fp16 with a shortened mantissa, keeping the most important ones exact."""

from __future__ import annotations

import torch
from torch import Tensor

FP16_MANTISSA_BITS = 10
FP16_MAX_FINITE = 0x7BFF
"""Bit pattern (sign cleared) of the largest finite fp16 value."""


def round_mantissa(x: Tensor, keep_bits: int) -> Tensor:
    """`x` as fp16 with only `keep_bits` of its 10 mantissa bits, in `x`'s dtype.

    The fp16 value of `x` (saturated to the fp16 range) is rounded to nearest, ties to even,
    on its bit pattern, so a carry moves to the next binade and subnormals round to multiples
    of `2^(-14 - keep_bits)`. Values that would leave the finite range saturate at the largest
    finite value with that mantissa, and a non-zero `x` never becomes zero: it gets the
    smallest non-zero magnitude `2^(-14 - keep_bits)` (`2^-16` for keep-bits 2) with its sign.
    Zeros stay zeros.

    Raises:
        ValueError: keep_bits is not in [0, 10].
    """
    if not 0 <= keep_bits <= FP16_MANTISSA_BITS:
        raise ValueError(f"keep-bits must be in [0, {FP16_MANTISSA_BITS}], got {keep_bits}")
    half = x.detach().to(torch.float32).clamp(-65504.0, 65504.0).to(torch.float16)
    bits = half.view(torch.int16).to(torch.int32) & 0xFFFF
    sign, mag = bits & 0x8000, bits & 0x7FFF
    drop = FP16_MANTISSA_BITS - keep_bits
    if drop:
        lsb = (mag >> drop) & 1
        mag = ((mag + (1 << (drop - 1)) - 1 + lsb) >> drop) << drop
        mag = mag.clamp(max=(FP16_MAX_FINITE >> drop) << drop)
    mag = torch.where((mag == 0) & (x != 0), torch.full_like(mag, 1 << drop), mag)
    signed = (sign | mag) - ((sign != 0).to(torch.int32) << 16)
    out = signed.to(torch.int16).view(torch.float16)
    return out.to(x.dtype)


def protected_round(
    w: Tensor, importance: Tensor, keep_bits: int, keep_proportion: float
) -> tuple[Tensor, Tensor]:
    """Round `w` with `round_mantissa`, except its most important entries, which keep fp16.

    An entry's score is `|w - round_mantissa(w)| * importance` (importance broadcasts against
    `w`; for a linear, `sqrt(E[x^2])` of its input channel). The `round(keep_proportion *
    numel)` entries with the largest scores (ties by position) keep their plain fp16 value.

    Returns:
        the rounded weight in `w`'s dtype, and the bool mask of the entries kept in fp16.

    Raises:
        ValueError: keep_bits outside [0, 10] or keep_proportion outside [0, 1].
    """
    if not 0.0 <= keep_proportion <= 1.0:
        raise ValueError(f"keep-proportion must be in [0, 1], got {keep_proportion}")
    rounded = round_mantissa(w, keep_bits)
    score = (w.detach().to(torch.float32) - rounded.to(torch.float32)).abs() * importance
    count = round(keep_proportion * w.numel())
    kept = torch.zeros(w.numel(), dtype=torch.bool)
    if count:
        order = torch.argsort(score.reshape(-1), descending=True, stable=True)
        kept[order[:count]] = True
    kept = kept.reshape(w.shape)
    fp16 = w.detach().to(torch.float32).clamp(-65504.0, 65504.0).to(torch.float16).to(w.dtype)
    return torch.where(kept, fp16, rounded), kept
