"""Online rotation custom op (`slimc::hadamard`): the PyTorch reference and its fake impl."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimc.rotate.hadamard import apply as apply_hadamard

__all__ = ["hadamard", "hadamard_quantize_per_token"]


@torch.library.custom_op(
    "slimc::hadamard", mutates_args=(), schema="(Tensor x, Tensor signs) -> Tensor"
)
def hadamard(x: Tensor, signs: Tensor) -> Tensor:
    """`x @ (H diag(signs) / sqrt(n))` over the last dim (n = x.shape[-1]).

    H is `slimc.rotate.hadamard(n)` (Paley x Sylvester for n = m * 2^k), so with signs from
    `random_signs(n, seed)` this is the rotation `x Q` by `random_hadamard(n, seed)`. Computed in
    float64, one small matmul per Kronecker factor of H (`slimc.rotate.hadamard.apply`), and
    returned in x's dtype.
    """
    n = x.shape[-1]
    if signs.shape != (n,):
        raise ValueError(f"signs must have shape [{n}], got {list(signs.shape)}")
    rotated = apply_hadamard(x.to(torch.float64)) / math.sqrt(n)
    return (rotated * signs.to(torch.float64)).to(x.dtype)


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
