"""Kernel op `slimc::triton_hadamard_quantize_per_token` and the CUDA kernel of
`slimc::hadamard_quantize_per_token`.

Both run the fused Triton kernel on CUDA tensors when triton is importable and fall back to
the PyTorch reference (`slimc::hadamard` then `slimc::quantize_per_token`) elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from slimc.kernels.hadamard_quant import dispatch as dsp
from torch import Tensor

import slimc.ops  # noqa: F401  (defines slimc::hadamard_quantize_per_token)

logger = logging.getLogger(__name__)

__all__ = ["HAS_TRITON", "triton_hadamard_quantize_per_token"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Whether triton can be imported (it is imported lazily, on the first CUDA call)."""

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _reference(x: Tensor, signs: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """hadamard then quantize_per_token (the fused op's reference), on any device."""
    y = torch.ops.slimc.hadamard(x, signs)
    return torch.ops.slimc.quantize_per_token(y, qmin, qmax)


@torch.library.custom_op(
    "slimc::triton_hadamard_quantize_per_token",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor signs, int qmin, int qmax, str kernel, int[] config) "
        "-> (Tensor q, Tensor scale)"
    ),
)
def triton_hadamard_quantize_per_token(
    x: Tensor, signs: Tensor, qmin: int, qmax: int, kernel: str, config: list[int]
) -> tuple[Tensor, Tensor]:
    """`slimc.hadamard_quantize_per_token` bound to one kernel and static config (see
    `dispatch.config_values`). Off CUDA this is the reference."""
    dsp.config_from_values(kernel, config)
    return _reference(x, signs, qmin, qmax)


@triton_hadamard_quantize_per_token.register_fake
def _(x, signs, qmin, qmax, kernel, config):
    dsp.config_from_values(kernel, config)
    torch._check(signs.dim() == 1 and signs.shape[0] == x.shape[-1], lambda: "signs: shape [n]")
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
    )


def _supported(x: Tensor, qmin: int, qmax: int) -> bool:
    if not (HAS_TRITON and x.dtype in _FLOATS and -128 <= qmin < 0 < qmax <= 127):
        return False
    try:
        dsp.factor_orders(x.shape[-1])
    except ValueError:
        return False
    return True


@triton_hadamard_quantize_per_token.register_kernel("cuda")
def _(x, signs, qmin, qmax, kernel, config):
    cfg = dsp.config_from_values(kernel, config)
    if not _supported(x, qmin, qmax):
        return _reference(x, signs, qmin, qmax)
    from slimc.kernels.hadamard_quant.launcher import hadamard_quantize

    return hadamard_quantize(x, signs, qmin, qmax, kernel, cfg)


def _hadamard_quantize_cuda(x: Tensor, signs: Tensor, qmin: int = -128, qmax: int = 127):
    if not _supported(x, qmin, qmax):
        return _reference(x, signs, qmin, qmax)
    from slimc.kernels.hadamard_quant.launcher import hadamard_quantize

    return hadamard_quantize(x, signs, qmin, qmax)


if HAS_TRITON:
    torch.library.register_kernel(
        "slimc::hadamard_quantize_per_token", "cuda", _hadamard_quantize_cuda
    )
else:
    logger.debug("triton is not installed: slimc::hadamard_quantize_per_token keeps its reference")
