"""`slimc::npu_linear_*` kernel ops: torch_npu on an NPU, the documented-semantics emulation elsewhere.

Every op takes the float activation first and then constants laid out exactly as the torch_npu
ops read them (see `slimc.kernels.npu.layout`). On a tensor whose device is `npu`, with torch_npu
importable, the op calls torch_npu; on any other device it runs `slimc.kernels.npu.emulate`, a
pure-PyTorch model of the same calls. torch_npu is imported lazily, only on the NPU path.

| op                          | torch_npu calls                                         |
|-----------------------------|---------------------------------------------------------|
| npu_linear_w8a8_dynamic     | npu_dynamic_quant + npu_quant_matmul(pertoken_scale)    |
| npu_linear_w4a8_dynamic     | same, on int4 weight values held in int8                |
| npu_linear_w4a4_dynamic     | npu_dynamic_quant(quint4x2) + npu_quant_matmul on int32 |
| npu_linear_w8a8             | npu_quantize(div_mode) + npu_quant_matmul(deq_scale, quant_bias) |
| npu_linear_w8a16 / w4a16    | npu_weight_quant_batchmatmul (int8 / int4pack weight)   |
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from slimc.kernels.npu import emulate as emu

__all__ = [
    "npu_linear_w4a4_dynamic",
    "npu_linear_w4a8_dynamic",
    "npu_linear_w4a16",
    "npu_linear_w8a8",
    "npu_linear_w8a8_dynamic",
    "npu_linear_w8a16",
    "torch_npu_for",
]


def torch_npu_for(x: Tensor) -> ModuleType | None:
    """torch_npu when `x` lives on an NPU and torch_npu imports; None means: emulate."""
    if x.device.type != "npu":
        return None
    try:
        return importlib.import_module("torch_npu")
    except ImportError:
        return None


def _check_half(x: Tensor, op: str) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{op} on an NPU needs float16 or bfloat16 activations, got {x.dtype}")


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _out(x: Tensor, y: Tensor) -> Tensor:
    return y.reshape(*x.shape[:-1], y.shape[-1]).contiguous()


def _n_of(weight: Tensor) -> int:
    return weight.shape[1] * (8 if weight.dtype == torch.int32 else 1)


# --------------------------------------------------------------------------- dynamic per-token


def _dynamic(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, int4: bool, op: str
) -> Tensor:
    npu = torch_npu_for(x)
    if npu is not None:
        _check_half(x, op)
        quant, matmul = npu.npu_dynamic_quant, npu.npu_quant_matmul
    else:
        quant, matmul = emu.emulate_npu_dynamic_quant, emu.emulate_npu_quant_matmul
    kwargs = {"dst_type": torch.quint4x2} if int4 else {}
    xq, scale = quant(_rows(x), **kwargs)
    y = matmul(
        xq, weight, weight_scale, pertoken_scale=scale.reshape(-1), bias=bias, output_dtype=x.dtype
    )
    return _out(x, y)


def _fake_dynamic(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], _n_of(weight)))


@torch.library.custom_op(
    "slimc::npu_linear_w8a8_dynamic",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor",
)
def npu_linear_w8a8_dynamic(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """Per-token int8 x int8 weight [K, N]; weight_scale f32 [N]; float bias [N]."""
    return _dynamic(x, weight, weight_scale, bias, False, "npu_linear_w8a8_dynamic")


@npu_linear_w8a8_dynamic.register_fake
def _(x, weight, weight_scale, bias):
    return _fake_dynamic(x, weight)


@torch.library.custom_op(
    "slimc::npu_linear_w4a8_dynamic",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor",
)
def npu_linear_w4a8_dynamic(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """Per-token int8 x int4 weight values widened to int8 [K, N] (the int8 x int8 matmul)."""
    return _dynamic(x, weight, weight_scale, bias, False, "npu_linear_w4a8_dynamic")


@npu_linear_w4a8_dynamic.register_fake
def _(x, weight, weight_scale, bias):
    return _fake_dynamic(x, weight)


@torch.library.custom_op(
    "slimc::npu_linear_w4a4_dynamic",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor",
)
def npu_linear_w4a4_dynamic(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """Per-token int4 x int4pack weight int32 [K, N // 8] (int4 matmul, K divisible by 8)."""
    return _dynamic(x, weight, weight_scale, bias, True, "npu_linear_w4a4_dynamic")


@npu_linear_w4a4_dynamic.register_fake
def _(x, weight, weight_scale, bias):
    return _fake_dynamic(x, weight)


# --------------------------------------------------------------------------- static per-tensor


@torch.library.custom_op(
    "slimc::npu_linear_w8a8",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor input_scale, Tensor input_offset, Tensor weight, Tensor deq_scale, "
        "Tensor? quant_bias) -> Tensor"
    ),
)
def npu_linear_w8a8(
    x: Tensor,
    input_scale: Tensor,
    input_offset: Tensor,
    weight: Tensor,
    deq_scale: Tensor,
    quant_bias: Tensor | None,
) -> Tensor:
    """Static per-tensor int8: q = round(x / input_scale + input_offset); (q @ w + quant_bias) * deq_scale.

    input_scale f32 [1], input_offset i32 [1], weight int8 [K, N], deq_scale f32 [N] (int64
    [N] from npu_trans_quant_param for float16 outputs), quant_bias i32 [N].
    """
    npu = torch_npu_for(x)
    if npu is not None:
        _check_half(x, "npu_linear_w8a8")
        xq = npu.npu_quantize(_rows(x), input_scale, input_offset, torch.qint8, -1, True)
        y = npu.npu_quant_matmul(xq, weight, deq_scale, bias=quant_bias, output_dtype=x.dtype)
    else:
        xq = emu.emulate_npu_quantize(_rows(x), input_scale, input_offset, torch.qint8, -1, True)
        y = emu.emulate_npu_quant_matmul(
            xq, weight, deq_scale, bias=quant_bias, output_dtype=x.dtype
        )
    return _out(x, y)


@npu_linear_w8a8.register_fake
def _(x, input_scale, input_offset, weight, deq_scale, quant_bias):
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


# --------------------------------------------------------------------------- weight only


def _weight_only(
    x: Tensor,
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Tensor | None,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    npu = torch_npu_for(x)
    if npu is not None:
        _check_half(x, "npu_weight_quant_batchmatmul")
        fn = npu.npu_weight_quant_batchmatmul
    else:
        fn = emu.emulate_npu_weight_quant_batchmatmul
    y = fn(
        _rows(x),
        weight,
        antiquant_scale,
        antiquant_offset,
        bias=bias,
        antiquant_group_size=group_size,
    )
    return _out(x, y)


@torch.library.custom_op(
    "slimc::npu_linear_w8a16",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor? antiquant_offset, "
        "int antiquant_group_size, Tensor? bias) -> Tensor"
    ),
)
def npu_linear_w8a16(
    x: Tensor,
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Tensor | None,
    antiquant_group_size: int,
    bias: Tensor | None,
) -> Tensor:
    """Weight-only int8 [K, N]; antiquant scale/offset [G, N] in x's dtype (offset = -zp)."""
    return _weight_only(x, weight, antiquant_scale, antiquant_offset, antiquant_group_size, bias)


@npu_linear_w8a16.register_fake
def _(x, weight, antiquant_scale, antiquant_offset, antiquant_group_size, bias):
    return x.new_empty((*x.shape[:-1], _n_of(weight)))


@torch.library.custom_op(
    "slimc::npu_linear_w4a16",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor? antiquant_offset, "
        "int antiquant_group_size, Tensor? bias) -> Tensor"
    ),
)
def npu_linear_w4a16(
    x: Tensor,
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Tensor | None,
    antiquant_group_size: int,
    bias: Tensor | None,
) -> Tensor:
    """Weight-only int4: int4pack weight int32 [K, N // 8]; antiquant scale/offset [G, N]."""
    return _weight_only(x, weight, antiquant_scale, antiquant_offset, antiquant_group_size, bias)


@npu_linear_w4a16.register_fake
def _(x, weight, antiquant_scale, antiquant_offset, antiquant_group_size, bias):
    return x.new_empty((*x.shape[:-1], _n_of(weight)))
