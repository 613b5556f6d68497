"""`slimc::triton_linear_w4a16` (the lowered kernel op) and the CUDA kernel of `slimc::linear_w4a16`.

Both run the Triton kernels on CUDA tensors when triton is importable and fall back to the
PyTorch reference everywhere else, so a lowered graph runs on any device.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

import slimc.ops  # noqa: F401  (defines slimc::linear_w4a16)
from slimc.kernels.w4a16 import dispatch as dsp
from slimc.ops.linear import dequantize_weight
from slimc.ops.packing import unpack_int4

logger = logging.getLogger(__name__)

__all__ = ["HAS_TRITON", "triton_linear_w4a16"]


def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None
        return False


HAS_TRITON = _has_triton()
"""Whether triton can be imported (it is imported lazily, on the first CUDA call)."""

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _reference(x, qweight, scale, zero_point, group_size, bias) -> Tensor:
    """The reference math of `slimc::linear_w4a16`, called directly: dispatching to the op from
    its own CUDA kernel would recurse."""
    if qweight.dtype != torch.uint8:
        raise ValueError(f"qweight must be torch.uint8, got {qweight.dtype}")
    w = dequantize_weight(unpack_int4(qweight), scale, zero_point, group_size)
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"packed weight input dim K: expected {x.shape[-1]}, got {w.shape[1]}")
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w.to(x.dtype), b).contiguous()


@torch.library.custom_op(
    "slimc::triton_linear_w4a16",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor qweight, Tensor scale, Tensor? zero_point, int group_size, "
        "Tensor? bias, str kernel, int[] config) -> Tensor"
    ),
)
def triton_linear_w4a16(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    group_size: int,
    bias: Tensor | None,
    kernel: str,
    config: list[int],
) -> Tensor:
    """W4A16 linear bound to one kernel and static config (see `dispatch.config_values`).

    Off CUDA this is the reference `slimc::linear_w4a16` (the kernel and config are validated,
    then ignored).
    """
    dsp.config_from_values(kernel, config)
    return _reference(x, qweight, scale, zero_point, group_size, bias)


@triton_linear_w4a16.register_fake
def _(x, qweight, scale, zero_point, group_size, bias, kernel, config):
    dsp.config_from_values(kernel, config)
    torch._check(
        qweight.shape[1] * 2 == x.shape[-1],
        lambda: f"packed weight input dim K: expected {x.shape[-1]}, got {qweight.shape[1] * 2}",
    )
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _triton_ok(x: Tensor) -> bool:
    return HAS_TRITON and x.dtype in _SUPPORTED


@triton_linear_w4a16.register_kernel("cuda")
def _(x, qweight, scale, zero_point, group_size, bias, kernel, config):
    cfg = dsp.config_from_values(kernel, config)
    if not _triton_ok(x):
        return _reference(x, qweight, scale, zero_point, group_size, bias)
    from slimc.kernels.w4a16.launcher import launch

    return launch(x, qweight, scale, zero_point, group_size, bias, kernel, cfg)


def _linear_w4a16_cuda(x, qweight, scale, zero_point, group_size, bias) -> Tensor:
    if not _triton_ok(x):
        return _reference(x, qweight, scale, zero_point, group_size, bias)
    from slimc.kernels.w4a16.launcher import linear_w4a16

    return linear_w4a16(x, qweight, scale, zero_point, group_size, bias)


if HAS_TRITON:
    torch.library.register_kernel("slimc::linear_w4a16", "cuda", _linear_w4a16_cuda)
else:
    logger.debug("triton is not installed: slimc::linear_w4a16 keeps its reference CUDA path")
