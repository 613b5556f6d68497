"""Kernel ops `slimc::triton_hadamard_quantize_per_token` and `slimc::triton_linear_w8a8_hadamard`
and the CUDA kernel of `slimc::hadamard_quantize_per_token`.

They run the fused Triton kernel on CUDA tensors when triton is importable and fall back to
the PyTorch reference (`slimc::hadamard` then `slimc::quantize_per_token`) elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import Tensor

import slimc.ops  # noqa: F401  (defines slimc::hadamard_quantize_per_token)
from slimc.kernels.hadamard_quant import dispatch as dsp

logger = logging.getLogger(__name__)

__all__ = ["HAS_TRITON", "triton_hadamard_quantize_per_token", "triton_linear_w8a8_hadamard"]

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


@torch.library.custom_op(
    "slimc::triton_linear_w8a8_hadamard",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor signs, Tensor qweight, Tensor w_scale, Tensor? bias, int qmin, "
        "int qmax, str rotate_kernel, int[] rotate_config, str kernel, int[] config, "
        "ScalarType? out_dtype=None) -> Tensor"
    ),
)
def triton_linear_w8a8_hadamard(
    x: Tensor,
    signs: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    qmin: int,
    qmax: int,
    rotate_kernel: str,
    rotate_config: list[int],
    kernel: str,
    config: list[int],
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """An online-rotated dynamic int8 linear in one kernel op: `slimc.hadamard(x, signs)`,
    per-token int8 quantization (both in the hadamard_quant kernel), then the w8a8 int8 GEMM
    (`kernel`, `config` of the w8a8 family) on the codes. Off CUDA this is the reference."""
    from slimc.kernels.w8a8 import dispatch as w8a8_dispatch

    dsp.config_from_values(rotate_kernel, rotate_config)
    w8a8_dispatch.config_from_values(kernel, config)
    xq, x_scale = _reference(x, signs, qmin, qmax)
    return torch.ops.slimc.linear_w8a8(
        xq, x_scale, None, qweight, w_scale, bias, out_dtype or x.dtype
    )


@triton_linear_w8a8_hadamard.register_fake
def _(x, signs, qweight, w_scale, bias, qmin, qmax, rotate_kernel, rotate_config, kernel,
      config, out_dtype=None):  # fmt: skip
    torch._check(signs.dim() == 1 and signs.shape[0] == x.shape[-1], lambda: "signs: shape [n]")
    torch._check(qweight.shape[1] == x.shape[-1], lambda: "qweight: shape [N, K]")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=out_dtype or x.dtype)


@triton_linear_w8a8_hadamard.register_kernel("cuda")
def linear_w8a8_hadamard_triton(x, signs, qweight, w_scale, bias, qmin, qmax, rotate_kernel,
                                rotate_config, kernel, config, out_dtype=None):  # fmt: skip
    """The Triton path of `slimc::triton_linear_w8a8_hadamard` (its CUDA kernel; also runs on
    CPU tensors under TRITON_INTERPRET=1)."""
    from slimc.kernels.w8a8 import dispatch as w8a8_dispatch

    rotate_cfg = dsp.config_from_values(rotate_kernel, rotate_config)
    cfg = w8a8_dispatch.config_from_values(kernel, config)
    if not _supported(x, qmin, qmax):
        xq, x_scale = _reference(x, signs, qmin, qmax)
        return torch.ops.slimc.linear_w8a8(
            xq, x_scale, None, qweight, w_scale, bias, out_dtype or x.dtype
        )
    from slimc.kernels.hadamard_quant.launcher import hadamard_quantize
    from slimc.kernels.w8a8.launcher import linear_prequantized

    xq, x_scale = hadamard_quantize(x, signs, qmin, qmax, rotate_kernel, rotate_cfg)
    out_dtype = out_dtype or x.dtype
    return linear_prequantized(xq, x_scale, None, qweight, w_scale, bias, out_dtype, kernel, cfg)


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
