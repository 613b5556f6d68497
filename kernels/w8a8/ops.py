"""W8A8 kernel ops (`slimc::triton_linear_w8a8_dynamic` / `_static`) and CUDA kernels of
`slimc::quantize_per_token` and `slimc::linear_w8a8`.

Each runs the Triton kernels on CUDA tensors when triton is importable and falls back to the
PyTorch reference everywhere else, so a lowered graph runs on any device.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import Tensor

import slimc.ops  # noqa: F401  (defines slimc::quantize_per_token, slimc::linear_w8a8)
from slimc.kernels.w8a8 import dispatch as dsp
from slimc.ops.linear import _int_linear
from slimc.quant.qparams import FP32_EPS

logger = logging.getLogger(__name__)

__all__ = ["HAS_TRITON", "triton_linear_w8a8_dynamic", "triton_linear_w8a8_static"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Whether triton can be imported (it is imported lazily, on the first CUDA call)."""

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def check_int8_range(qmin: int, qmax: int, symmetric: bool = True) -> None:
    """ValueError unless [qmin, qmax] holds int8 codes: -128 <= qmin < 0 < qmax <= 127 for a
    symmetric (per-token) quantizer, -128 <= qmin < qmax <= 127 with a zero point."""
    ok = -128 <= qmin < 0 < qmax <= 127 if symmetric else -128 <= qmin < qmax <= 127
    if not ok:
        want = "qmin < 0 < qmax" if symmetric else "qmin < qmax"
        raise ValueError(f"qmin={qmin}, qmax={qmax}: expected int8 codes with {want}")


def _out_shape(x: Tensor, qweight: Tensor) -> list[int]:
    torch._check(
        qweight.shape[1] == x.shape[-1],
        lambda: f"weight input dim K: expected {x.shape[-1]}, got {qweight.shape[1]}",
    )
    return [*x.shape[:-1], qweight.shape[0]]


def _ref_quantize_per_token(x: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """The reference math of `slimc::quantize_per_token` (calling the op from its own CUDA
    kernel would recurse)."""
    xf = x.detach().to(torch.float32)
    scale = torch.clamp(xf.abs().amax(dim=-1, keepdim=True) / float(qmax), min=FP32_EPS)
    q = torch.clamp(torch.round(xf / scale), qmin, qmax).to(torch.int8)
    return q.contiguous(), scale.contiguous()


# --------------------------------------------------------------------------- kernel ops


@torch.library.custom_op(
    "slimc::triton_linear_w8a8_dynamic",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor qweight, Tensor w_scale, Tensor? bias, int qmin, int qmax, "
        "str kernel, int[] config, ScalarType? out_dtype=None) -> Tensor"
    ),
)
def triton_linear_w8a8_dynamic(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    qmin: int,
    qmax: int,
    kernel: str,
    config: list[int],
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Float x -> per-token int8 -> x int8 weight [N, K] (per-channel w_scale), one kernel op.

    `slimc.quantize_per_token(x, qmin, qmax)` + `slimc.linear_w8a8` bound to one kernel and
    static config (see `dispatch.config_values`); out_dtype defaults to x's dtype. Off CUDA
    this is that reference (the kernel and config are validated, then ignored).
    """
    dsp.config_from_values(kernel, config)
    check_int8_range(qmin, qmax)
    xq, x_scale = torch.ops.slimc.quantize_per_token(x, qmin, qmax)
    return torch.ops.slimc.linear_w8a8(
        xq, x_scale, None, qweight, w_scale, bias, out_dtype or x.dtype
    )


@triton_linear_w8a8_dynamic.register_fake
def _(x, qweight, w_scale, bias, qmin, qmax, kernel, config, out_dtype=None):
    dsp.config_from_values(kernel, config)
    return x.new_empty(_out_shape(x, qweight), dtype=out_dtype or x.dtype)


@triton_linear_w8a8_dynamic.register_kernel("cuda")
def _(x, qweight, w_scale, bias, qmin, qmax, kernel, config, out_dtype=None):
    cfg = dsp.config_from_values(kernel, config)
    check_int8_range(qmin, qmax)
    if not (HAS_TRITON and x.dtype in _FLOATS):
        xq, x_scale = _ref_quantize_per_token(x, qmin, qmax)
        return _int_linear(xq, x_scale, None, qweight, w_scale, bias, out_dtype or x.dtype)
    from slimc.kernels.w8a8.launcher import linear_dynamic

    return linear_dynamic(x, qweight, w_scale, bias, qmin, qmax, kernel, cfg, out_dtype)


@torch.library.custom_op(
    "slimc::triton_linear_w8a8_static",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor x_scale, Tensor? x_zero_point, Tensor qweight, Tensor w_scale, "
        "Tensor? bias, int qmin, int qmax, str kernel, int[] config, "
        "ScalarType? out_dtype=None) -> Tensor"
    ),
)
def triton_linear_w8a8_static(
    x: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor | None,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    qmin: int,
    qmax: int,
    kernel: str,
    config: list[int],
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Float x -> static per-tensor int8 (one scale and zero point) -> x int8 weight, one op.

    `slimc.quantize_affine(x, per-tensor, x_scale, x_zero_point, qmin, qmax, int8)` +
    `slimc.linear_w8a8`, bound to one kernel and static config; out_dtype defaults to x's dtype.
    """
    dsp.config_from_values(kernel, config)
    check_int8_range(qmin, qmax, symmetric=False)
    block = [-1] * x.dim()
    xq = torch.ops.slimc.quantize_affine(x, block, x_scale, x_zero_point, qmin, qmax, torch.int8)
    return torch.ops.slimc.linear_w8a8(
        xq, x_scale, x_zero_point, qweight, w_scale, bias, out_dtype or x.dtype
    )


@triton_linear_w8a8_static.register_fake
def _(x, x_scale, x_zero_point, qweight, w_scale, bias, qmin, qmax, kernel, config, out_dtype=None):
    dsp.config_from_values(kernel, config)
    return x.new_empty(_out_shape(x, qweight), dtype=out_dtype or x.dtype)


@triton_linear_w8a8_static.register_kernel("cuda")
def _(x, x_scale, x_zero_point, qweight, w_scale, bias, qmin, qmax, kernel, config, out_dtype=None):
    cfg = dsp.config_from_values(kernel, config)
    check_int8_range(qmin, qmax, symmetric=False)
    if not (HAS_TRITON and x.dtype in _FLOATS):
        block = [-1] * x.dim()
        xq = torch.ops.slimc.quantize_affine(
            x, block, x_scale, x_zero_point, qmin, qmax, torch.int8
        )
        return _int_linear(xq, x_scale, x_zero_point, qweight, w_scale, bias, out_dtype or x.dtype)
    from slimc.kernels.w8a8.launcher import linear_static

    return linear_static(
        x, x_scale, x_zero_point, qweight, w_scale, bias, qmin, qmax, kernel, cfg, out_dtype
    )


# --------------------------------------------------------------------------- CUDA kernels of
# the reference ops (registered at import; without triton they keep the reference math)


def _quantize_per_token_cuda(x: Tensor, qmin: int = -128, qmax: int = 127):
    if not (HAS_TRITON and x.dtype in _FLOATS and -128 <= qmin < 0 < qmax <= 127):
        return _ref_quantize_per_token(x, qmin, qmax)
    from slimc.kernels.w8a8.launcher import quantize_per_token

    return quantize_per_token(x.detach(), qmin, qmax)


def _linear_w8a8_cuda(xq, x_scale, x_zero_point, qweight, w_scale, bias, out_dtype):
    m = xq.numel() // max(1, xq.shape[-1])
    ok = (
        HAS_TRITON
        and xq.dtype == torch.int8
        and qweight.dtype == torch.int8
        and qweight.dim() == 2
        and x_scale.numel() in (1, m)
        and (x_zero_point is None or x_zero_point.numel() == 1)
    )
    if not ok:
        return _int_linear(xq, x_scale, x_zero_point, qweight, w_scale, bias, out_dtype)
    from slimc.kernels.w8a8.launcher import linear_prequantized

    return linear_prequantized(xq, x_scale, x_zero_point, qweight, w_scale, bias, out_dtype)


if HAS_TRITON:
    torch.library.register_kernel("slimc::quantize_per_token", "cuda", _quantize_per_token_cuda)
    torch.library.register_kernel("slimc::linear_w8a8", "cuda", _linear_w8a8_cuda)
else:
    logger.debug("triton is not installed: slimc::linear_w8a8 keeps its reference CUDA path")
