"""Pure-PyTorch models of the torch_npu quantization ops, as their documentation defines them.

Each `emulate_*` function takes the same arguments, in the same layouts and dtypes, as the
torch_npu op it models, and returns what the documentation says the op returns. They run on any
device; the `slimc::npu_*` kernel ops use them wherever torch_npu or an NPU is missing, and the
tests check the lowering's re-laid-out constants against them.

Modelled semantics (torch_npu API reference):
  npu_dynamic_quant(x)          scale = max|x| / 127 per row (last dim), y = round(x / scale);
                                `dst_type=torch.quint4x2`: / 7, values in [-8, 7], int4-packed.
  npu_quantize(x, s, zp, ..., div_mode)
                                round(x / s + zp) (div_mode) or round(x * s + zp), saturated.
  npu_quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype)
                                ((x1 @ x2 [+ int32 bias]) * scale [+ offset]) [* pertoken_scale]
                                [+ float bias]; x2 is [K, N]; int32 inputs carry 8 int4 each.
  npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, ..., bias, group)
                                x @ ((weight + antiquant_offset) * antiquant_scale) + bias; the
                                offset is ADDED (it is minus the zero point); per-group scale and
                                offset are [ceil(K / group), N].
  npu_convert_weight_to_int4pack(w)
                                int32 [..., n] in [-8, 7] -> int32 [..., n / 8]; element j of
                                each run of 8 sits in bits 4j..4j+3 as a two's-complement nibble.
  npu_trans_quant_param(scale, offset)
                                int64: float32 bits & 0xFFFFE000 (19 high bits kept), bit 46 set,
                                the 9-bit offset in bits 37..45.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "decode_quant_scale",
    "emulate_npu_convert_weight_to_int4pack",
    "emulate_npu_dynamic_quant",
    "emulate_npu_quant_matmul",
    "emulate_npu_quantize",
    "emulate_npu_trans_quant_param",
    "emulate_npu_weight_quant_batchmatmul",
    "unpack_int4pack",
]

_FP32_EPS = torch.finfo(torch.float32).eps
_SCALE_MASK = 0xFFFFE000
_FLAG_BIT = 46
_OFFSET_SHIFT = 37


# --------------------------------------------------------------------------- int4 packing


def emulate_npu_convert_weight_to_int4pack(weight: Tensor, inner_k_tiles: int = 0) -> Tensor:
    """int32 [..., n] holding int4 values -> int32 [..., n // 8] (8 nibbles per word, low first).

    Raises:
        ValueError: not int32, last dim not a multiple of 8, or a value outside [-8, 7].
    """
    if weight.dtype != torch.int32:
        raise ValueError(f"npu_convert_weight_to_int4pack takes int32, got {weight.dtype}")
    if weight.dim() == 0 or weight.shape[-1] % 8 != 0:
        raise ValueError(
            f"npu_convert_weight_to_int4pack needs a last dim divisible by 8, got "
            f"{tuple(weight.shape)}"
        )
    if weight.numel() and (int(weight.min()) < -8 or int(weight.max()) > 7):
        raise ValueError("npu_convert_weight_to_int4pack values must lie in [-8, 7]")
    nibbles = (weight.to(torch.int64) & 0xF).reshape(*weight.shape[:-1], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=weight.device)
    words = (nibbles << shifts).sum(dim=-1)  # < 2^32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).contiguous()


def unpack_int4pack(packed: Tensor) -> Tensor:
    """Inverse of `emulate_npu_convert_weight_to_int4pack`: int32 [..., n / 8] -> int8 [..., n]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"int4-packed tensors are int32, got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    values = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * 8).to(torch.int8)


# --------------------------------------------------------------------------- quant params


def emulate_npu_trans_quant_param(scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """float32 scale (and optional offset) -> the int64 quant parameter the matmul ops read."""
    bits = scale.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    out = (bits & _SCALE_MASK) | (1 << _FLAG_BIT)
    if offset is not None:
        off = torch.clamp(torch.round(offset.to(torch.float32)), -256, 255).to(torch.int64)
        out = out | ((off & 0x1FF) << _OFFSET_SHIFT)
    return out.reshape(-1).contiguous()


def decode_quant_scale(scale: Tensor) -> Tensor:
    """The float32 multiplier a matmul op applies for `scale` (int64 parameters are decoded)."""
    if scale.dtype == torch.int64:
        low = (scale & 0xFFFFFFFF) & _SCALE_MASK
        low = torch.where(low >= 2**31, low - 2**32, low)
        return low.to(torch.int32).view(torch.float32)
    return scale.to(torch.float32)


# --------------------------------------------------------------------------- activations


def emulate_npu_dynamic_quant(
    x: Tensor, smooth_scales: Tensor | None = None, dst_type: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row symmetric quantization: (int8 y [..., K] or int4-packed int32, scale x.shape[:-1])."""
    xf = x.to(torch.float32)
    if smooth_scales is not None:
        xf = xf * smooth_scales.to(torch.float32)
    int4 = dst_type == torch.quint4x2
    qmin, qmax = (-8, 7) if int4 else (-128, 127)
    scale = torch.clamp(xf.abs().amax(dim=-1) / qmax, min=_FP32_EPS)
    y = torch.clamp(torch.round(xf / scale.unsqueeze(-1)), qmin, qmax)
    if int4:
        return emulate_npu_convert_weight_to_int4pack(y.to(torch.int32)), scale
    return y.to(torch.int8), scale


def emulate_npu_quantize(
    x: Tensor,
    scales: Tensor,
    zero_points: Tensor | None,
    dtype: torch.dtype,
    axis: int = 1,
    div_mode: bool = True,
) -> Tensor:
    """round(x / scales + zero_points) (or x * scales with div_mode=False), saturated to int8.

    Only the last-axis (per-tensor or per-channel along K) form the matmul paths use is modelled.
    """
    if dtype != torch.qint8:
        raise NotImplementedError(f"npu_quantize emulation models torch.qint8 only, got {dtype}")
    if axis not in (-1, x.dim() - 1):
        raise NotImplementedError("npu_quantize emulation models axis=-1 only")
    xf = x.to(torch.float32)
    s = scales.to(torch.float32).reshape(-1)
    q = xf / s if div_mode else xf * s
    if zero_points is not None:
        q = q + zero_points.to(torch.float32).reshape(-1)
    return torch.clamp(torch.round(q), -128, 127).to(torch.int8)


# --------------------------------------------------------------------------- matmuls


def _int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact a [..., K] @ b [K, N] for int8-range integers -> int32 (float64 accumulation)."""
    return torch.round(a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


def emulate_npu_quant_matmul(
    x1: Tensor,
    x2: Tensor,
    scale: Tensor,
    *,
    offset: Tensor | None = None,
    pertoken_scale: Tensor | None = None,
    bias: Tensor | None = None,
    output_dtype: torch.dtype | None = None,
) -> Tensor:
    """int8 (or int4 carried in int32) x1 [..., M, K] @ x2 [K, N], dequantized as documented."""
    if x1.dtype != x2.dtype:
        raise ValueError(f"x1 and x2 must share a dtype, got {x1.dtype} and {x2.dtype}")
    if x1.dtype == torch.int32:
        a, b = unpack_int4pack(x1), unpack_int4pack(x2)
    elif x1.dtype == torch.int8:
        a, b = x1, x2
    else:
        raise ValueError(f"npu_quant_matmul takes int8 or int4-packed int32, got {x1.dtype}")
    if a.shape[-1] != b.shape[0]:
        raise ValueError(f"x1 has K={a.shape[-1]} but x2 is {tuple(b.shape)} ([K, N] expected)")
    acc = _int_matmul(a, b)
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias
    out = acc.to(torch.float32) * decode_quant_scale(scale).reshape(-1)
    if offset is not None:
        out = out + offset.to(torch.float32).reshape(-1)
    if pertoken_scale is not None:
        out = out * pertoken_scale.to(torch.float32).unsqueeze(-1)
    if bias is not None and bias.dtype != torch.int32:
        out = out + bias.to(torch.float32)
    if output_dtype in (None, torch.int8):
        return torch.clamp(torch.round(out), -128, 127).to(torch.int8)
    return out.to(output_dtype)


def _expand_groups(t: Tensor, k: int, n: int, group_size: int) -> Tensor:
    """Antiquant scale/offset ((N,), (1, N) or (ceil(K / group), N)) -> [K, N]."""
    t = t.reshape(-1, n)
    if group_size > 0:
        return t.repeat_interleave(group_size, dim=0)[:k]
    if t.shape[0] != 1:
        raise ValueError(f"antiquant parameter of shape {tuple(t.shape)} needs a group size")
    return t.expand(k, n)


def emulate_npu_weight_quant_batchmatmul(
    x: Tensor,
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Tensor | None = None,
    quant_scale: Tensor | None = None,
    quant_offset: Tensor | None = None,
    bias: Tensor | None = None,
    antiquant_group_size: int = 0,
    inner_precise: int = 0,
) -> Tensor:
    """x [..., K] @ ((weight + antiquant_offset) * antiquant_scale) + bias, in x's dtype."""
    if quant_scale is not None or quant_offset is not None:
        raise NotImplementedError("output quantization (quant_scale) is not modelled")
    if antiquant_scale.dtype == torch.int64:
        raise NotImplementedError("int64 antiquant_scale is not modelled")
    if weight.dtype == torch.int32:
        w = unpack_int4pack(weight)
    elif weight.dtype == torch.int8:
        w = weight
    else:
        raise ValueError(f"weight must be int8 or int4-packed int32, got {weight.dtype}")
    k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but the weight is [K={k}, N={n}]")
    wf = w.to(torch.float32)
    if antiquant_offset is not None:
        wf = wf + _expand_groups(antiquant_offset.to(torch.float32), k, n, antiquant_group_size)
    wf = wf * _expand_groups(antiquant_scale.to(torch.float32), k, n, antiquant_group_size)
    out = x @ wf.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out
