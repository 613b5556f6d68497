"""Online rotation custom op (`slimc::hadamard`): the PyTorch reference and its fake impl."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimc.rotate.hadamard import apply as apply_hadamard

__all__ = ["hadamard", "hadamard_quantize_per_token", "rotation_scale"]


@torch.library.custom_op(
    "slimc::hadamard", mutates_args=(), schema="(Tensor x, Tensor signs) -> Tensor"
)
def hadamard(x: Tensor, signs: Tensor) -> Tensor:
    """`x @ (H diag(signs) / sqrt(n))` over the last dim (n = x.shape[-1]).

    H is `slimc.rotate.hadamard(n)` (Paley x Sylvester for n = m * 2^k), so with signs from
    `random_signs(n, seed)` this is the rotation `x Q` by `random_hadamard(n, seed)`. Computed in
    float32 (float64 for float64 x), one small matmul per Kronecker factor of H
    (`slimc.rotate.hadamard.apply`, sums of at most 128 terms: ~1e-7 relative), scaled by
    `signs / sqrt(n)` rounded to float32, and returned in x's dtype. Kernels compute it the same
    way, so a lowered model rounds every rotated activation to x's dtype exactly as this does
    (a value rounded differently can move a row's absmax, and with it every int8 code of
    the row).
    """
    n = x.shape[-1]
    if signs.shape != (n,):
        raise ValueError(f"signs must have shape [{n}], got {list(signs.shape)}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (apply_hadamard(x.to(compute)) * rotation_scale(signs, compute)).to(x.dtype)


def rotation_scale(signs: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """`signs / sqrt(n)` in `dtype` (computed in float64, then rounded once)."""
    return (signs.to(torch.float64) / math.sqrt(signs.shape[-1])).to(dtype)


@hadamard.register_fake
def _(x: Tensor, signs: Tensor) -> Tensor:
    torch._check(signs.dim() == 1 and signs.shape[0] == x.shape[-1], lambda: "signs: shape [n]")
    return torch.empty_like(x)


@torch.library.custom_op(
    "slimc::hadamard_quantize_per_token",
    mutates_args=(),
    schema="(Tensor x, Tensor signs, int qmin=-128, int qmax=127) -> (Tensor q, Tensor scale)",
)
def hadamard_quantize_per_token(
    x: Tensor, signs: Tensor, qmin: int = -128, qmax: int = 127
) -> tuple[Tensor, Tensor]:
    """`slimc::hadamard` then `slimc::quantize_per_token`: (q int8 [..., n], scale f32 [..., 1]).

    The rotated activation is rounded to x's dtype in between, exactly as the two ops in
    sequence; a kernel fuses both into one pass over x.
    """
    return torch.ops.slimc.quantize_per_token(hadamard(x, signs), qmin, qmax)


@hadamard_quantize_per_token.register_fake
def _(x: Tensor, signs: Tensor, qmin: int = -128, qmax: int = 127) -> tuple[Tensor, Tensor]:
    torch._check(signs.dim() == 1 and signs.shape[0] == x.shape[-1], lambda: "signs: shape [n]")
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
    )
