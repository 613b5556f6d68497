"""Quantized linear custom ops (w8a8, w8a16, w4a16, w4a8): the exact PyTorch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimc.ops.int8_products import int8_matmul
from slimc.ops.packing import unpack_int4

__all__ = [
    "dequantize_weight",
    "int8_matmul",
    "linear_w8a8",
    "linear_w8a16",
    "linear_w4a16",
    "linear_w4a8",
]


# --------------------------------------------------------------------------- helpers


def _check_dim(got: int, want: int, what: str) -> None:
    """Raise ValueError when two (possibly symbolic) sizes differ."""
    if isinstance(got, int) and isinstance(want, int):
        if got != want:
            raise ValueError(f"{what}: expected {want}, got {got}")
    else:
        torch._check(got == want, lambda: f"{what}: expected {want}, got {got}")


def _check_dtype(t: Tensor, dtype: torch.dtype, name: str) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


def _scalar_or_keep(t: Tensor) -> Tensor:
    """Collapse a one-element tensor to 0-d so it broadcasts against any output rank."""
    return t.reshape(()) if t.numel() == 1 else t


def _int_linear(
    xq: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor | None,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """((xq - zp) @ w.T) in int32, rescaled by x_scale * w_scale (+ bias) in float32."""
    k = xq.shape[-1]
    n = w.shape[0]
    _check_dim(w.shape[1], k, "weight input dim K")
    lead = xq.shape[:-1]
    acc = int8_matmul(xq.reshape(-1, k), w).reshape(*lead, n)
    if x_zero_point is not None:
        # (xq - zp) can leave the int8 range, so subtract zp * sum_k w[n, k] instead.
        w_sum = w.to(torch.int32).sum(dim=1)
        acc = acc - _scalar_or_keep(x_zero_point).to(torch.int32) * w_sum
    out = acc.to(torch.float32) * _scalar_or_keep(x_scale).to(torch.float32)
    out = out * w_scale.to(torch.float32).reshape(-1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype).contiguous()


def dequantize_weight(
    qweight: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    group_size: int,
) -> Tensor:
    """(q - zp) * scale for an int weight [N, K], per channel (-1) or per group -> float32."""
    n, k = qweight.shape
    group = k if group_size == -1 else group_size
    if group <= 0 or k % group != 0:
        raise ValueError(f"group_size={group_size} does not divide the weight's input dim K={k}")
    groups = k // group
    if scale.numel() != n * groups:
        raise ValueError(f"scale has shape {list(scale.shape)}; expected [{n}, {groups}]")
    q = qweight.to(torch.float32).reshape(n, groups, group)
    if zero_point is not None:
        q = q - zero_point.to(torch.float32).reshape(n, groups, 1)
    return (q * scale.to(torch.float32).reshape(n, groups, 1)).reshape(n, k)


def _float_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    _check_dim(w.shape[1], x.shape[-1], "weight input dim K")
    b = None if bias is None else bias.to(x.dtype)
    out = F.linear(x, w.to(x.dtype), b)
    # with a bias, F.linear on [..., K] returns a view of its 2-D result; a custom op's output
    # that is a view cannot be modified in place under autograd (Falcon's `mlp_output += ...`)
    return out.clone() if out._base is not None else out.contiguous()


def _out_shape(x: Tensor, n: int) -> list[int]:
    return [*x.shape[:-1], n]


# --------------------------------------------------------------------------- ops


@torch.library.custom_op(
    "slimc::linear_w8a8",
    mutates_args=(),
    schema=(
        "(Tensor xq, Tensor x_scale, Tensor? x_zero_point, Tensor qweight, Tensor w_scale, "
        "Tensor? bias, ScalarType out_dtype) -> Tensor"
    ),
)
def linear_w8a8(
    xq: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor | None,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """int8 activations (per-tensor or per-token [..., 1] scale) x int8 per-channel weights."""
    _check_dtype(xq, torch.int8, "xq")
    _check_dtype(qweight, torch.int8, "qweight")
    return _int_linear(xq, x_scale, x_zero_point, qweight, w_scale, bias, out_dtype)


@linear_w8a8.register_fake
def _(xq, x_scale, x_zero_point, qweight, w_scale, bias, out_dtype):
    _check_dim(qweight.shape[1], xq.shape[-1], "weight input dim K")
    return xq.new_empty(_out_shape(xq, qweight.shape[0]), dtype=out_dtype)


@torch.library.custom_op(
    "slimc::linear_w8a16",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor qweight, Tensor scale, Tensor? zero_point, int group_size, "
        "Tensor? bias) -> Tensor"
    ),
)
def linear_w8a16(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    """Weight-only int8: dequantize qweight [N, K] (per channel or per group), then F.linear."""
    _check_dtype(qweight, torch.int8, "qweight")
    w = dequantize_weight(qweight, scale, zero_point, group_size)
    return _float_linear(x, w, bias)


@linear_w8a16.register_fake
def _(x, qweight, scale, zero_point, group_size, bias):
    _check_dim(qweight.shape[1], x.shape[-1], "weight input dim K")
    return x.new_empty(_out_shape(x, qweight.shape[0]))


@torch.library.custom_op(
    "slimc::linear_w4a16",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor qweight, Tensor scale, Tensor? zero_point, int group_size, "
        "Tensor? bias) -> Tensor"
    ),
)
def linear_w4a16(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    """Weight-only int4: unpack qweight uint8 [N, K // 2], dequantize, then F.linear."""
    _check_dtype(qweight, torch.uint8, "qweight")
    w = dequantize_weight(unpack_int4(qweight), scale, zero_point, group_size)
    return _float_linear(x, w, bias)


@linear_w4a16.register_fake
def _(x, qweight, scale, zero_point, group_size, bias):
    _check_dim(qweight.shape[1] * 2, x.shape[-1], "packed weight input dim K")
    return x.new_empty(_out_shape(x, qweight.shape[0]))


@torch.library.custom_op(
    "slimc::linear_w4a8",
    mutates_args=(),
    schema=(
        "(Tensor xq, Tensor x_scale, Tensor qweight, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype) -> Tensor"
    ),
)
def linear_w4a8(
    xq: Tensor,
    x_scale: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Per-token int8 activations x per-channel symmetric int4 weights (uint8 [N, K // 2])."""
    _check_dtype(xq, torch.int8, "xq")
    _check_dtype(qweight, torch.uint8, "qweight")
    return _int_linear(xq, x_scale, None, unpack_int4(qweight), w_scale, bias, out_dtype)


@linear_w4a8.register_fake
def _(xq, x_scale, qweight, w_scale, bias, out_dtype):
    _check_dim(qweight.shape[1] * 2, xq.shape[-1], "packed weight input dim K")
    return xq.new_empty(_out_shape(xq, qweight.shape[0]), dtype=out_dtype)
