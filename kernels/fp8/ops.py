"""FP8 kernel op `slimc::triton_linear_fp8_rowwise` and CUDA kernels of `slimc::linear_fp8_rowwise`
and `slimc::quantize_per_token_fp8`.

Each runs the Triton kernels on CUDA tensors when triton is importable and the GPU has fp8
tensor cores (compute capability >= 8.9), and falls back to the PyTorch reference elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import Tensor

import slimc.ops  # noqa: F401  (defines slimc::linear_fp8_rowwise)
from slimc.kernels.fp8 import dispatch as dsp
from slimc.ops.fp8 import E4M3_MAX, _rowwise_fp8, fp8_matmul

logger = logging.getLogger(__name__)

__all__ = ["HAS_TRITON", "fp8_supported", "triton_linear_fp8_rowwise"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Whether triton can be imported (it is imported lazily, on the first CUDA call)."""

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def fp8_supported(t: Tensor) -> bool:
    """Whether the Triton fp8 kernels can run on t's device (triton, CUDA capability >= 8.9)."""
    if not (HAS_TRITON and t.is_cuda):
        return False
    return torch.cuda.get_device_capability(t.device) >= (8, 9)


def _reference(x, qweight, w_scale, bias, out_dtype) -> Tensor:
    """The math of `slimc::linear_fp8_rowwise`, called directly (the op would recurse)."""
    n, k = qweight.shape
    xq, x_scale = _rowwise_fp8(x)
    acc = fp8_matmul(xq.reshape(-1, k), qweight).reshape(*x.shape[:-1], n)
    out = acc * x_scale * w_scale.to(torch.float32).reshape(-1)
    if bias is not None:
        out = out + bias.to(torch.float32).reshape(-1)
    return out.to(out_dtype or x.dtype).contiguous()


@torch.library.custom_op(
    "slimc::triton_linear_fp8_rowwise",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor qweight, Tensor w_scale, Tensor? bias, str kernel, int[] config, "
        "ScalarType? out_dtype=None) -> Tensor"
    ),
)
def triton_linear_fp8_rowwise(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    kernel: str,
    config: list[int],
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """`slimc.linear_fp8_rowwise` bound to one kernel and static config (see
    `dispatch.config_values`). Off CUDA this is the reference (kernel and config are
    validated, then ignored)."""
    dsp.config_from_values(kernel, config)
    return torch.ops.slimc.linear_fp8_rowwise(x, qweight, w_scale, bias, out_dtype)


@triton_linear_fp8_rowwise.register_fake
def _(x, qweight, w_scale, bias, kernel, config, out_dtype=None):
    dsp.config_from_values(kernel, config)
    torch._check(
        qweight.shape[1] == x.shape[-1],
        lambda: f"weight input dim K: expected {x.shape[-1]}, got {qweight.shape[1]}",
    )
    return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=out_dtype or x.dtype)


def _run(x, qweight, w_scale, bias, kernel, cfg, out_dtype) -> Tensor:
    if not (fp8_supported(x) and x.dtype in _FLOATS):
        if qweight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"qweight must be torch.float8_e4m3fn, got {qweight.dtype}")
        return _reference(x, qweight, w_scale, bias, out_dtype)
    from slimc.kernels.w8a8.launcher import linear_dynamic

    return linear_dynamic(
        x, qweight, w_scale, bias, -E4M3_MAX, E4M3_MAX, kernel, cfg, out_dtype, dsp.KERNELS_FP8
    )


@triton_linear_fp8_rowwise.register_kernel("cuda")
def _(x, qweight, w_scale, bias, kernel, config, out_dtype=None):
    cfg = dsp.config_from_values(kernel, config)
    return _run(x, qweight, w_scale, bias, kernel, cfg, out_dtype)


def _linear_fp8_rowwise_cuda(x, qweight, w_scale, bias, out_dtype=None):
    return _run(x, qweight, w_scale, bias, dsp.AUTO, {}, out_dtype)


def _quantize_per_token_fp8_cuda(x):
    if not (fp8_supported(x) and x.dtype in _FLOATS):
        return _rowwise_fp8(x)
    from slimc.kernels.w8a8.launcher import quantize_per_token

    return quantize_per_token(x.detach(), -E4M3_MAX, E4M3_MAX, fp8=True)


if HAS_TRITON:
    torch.library.register_kernel("slimc::linear_fp8_rowwise", "cuda", _linear_fp8_rowwise_cuda)
    torch.library.register_kernel(
        "slimc::quantize_per_token_fp8", "cuda", _quantize_per_token_fp8_cuda
    )
else:
    logger.debug("triton is not installed: slimc::linear_fp8_rowwise keeps its reference path")
