"""Scale / zero-point math shared by observers, weight quantization and `slimc::` ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimc.quant.scheme import TensorQuantSpec

FP32_EPS = float(torch.finfo(torch.float32).eps)  # 1.1920928955078125e-07

__all__ = [
    "FP32_EPS",
    "QuantizedWeight",
    "calculate_qparams",
    "qparams_from_minmax",
    "quantize_weight",
]


def qparams_from_minmax(
    min_val: Tensor,
    max_val: Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    eps: float = FP32_EPS,
) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) from observed min/max, elementwise.

    The range is first widened so that min <= 0 <= max (zero must be representable).
    Asymmetric: scale = (max - min) / (qmax - qmin), zero_point = qmin - round(min / scale).
    Symmetric: scale = max(-min, max) / qmax, zero_point = 0. Scales are clamped to >= eps.
    """
    min_neg = torch.clamp(min_val.detach().to(torch.float32), max=0.0)
    max_pos = torch.clamp(max_val.detach().to(torch.float32), min=0.0)
    if symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp(amax / float(qmax), min=eps)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=eps)
        zp = float(qmin) - torch.round(min_neg / scale)
        zero_point = torch.clamp(zp, qmin, qmax).to(torch.int32)
    return scale, zero_point


def calculate_qparams(
    min_val: Tensor, max_val: Tensor, spec: TensorQuantSpec
) -> tuple[Tensor, Tensor]:
    """`qparams_from_minmax` with the integer range and symmetry taken from `spec`."""
    return qparams_from_minmax(min_val, max_val, spec.qmin, spec.qmax, spec.symmetric)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [N, K] quantized per channel (G = 1) or per group (G = K // group_size).

    Attributes:
        qdata: int8 [N, K], values in [spec.qmin, spec.qmax] (int4 values are not packed here).
        scale: float32 [N, G].
        zero_point: int8 [N, G], or None when the spec is symmetric.
        spec: the spec used to quantize.
    """

    qdata: Tensor
    scale: Tensor
    zero_point: Tensor | None
    spec: TensorQuantSpec

    @property
    def group_size(self) -> int:
        """Elements per scale along K (-1 for per channel)."""
        return self.spec.group_size if self.spec.granularity == "group" else -1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(qdata - zero_point) * scale, expanded over groups, as `dtype` [N, K]."""
        n, k = self.qdata.shape
        groups = self.scale.shape[1]
        q = self.qdata.to(torch.float32).reshape(n, groups, k // groups)
        if self.zero_point is not None:
            q = q - self.zero_point.to(torch.float32).unsqueeze(-1)
        return (q * self.scale.unsqueeze(-1)).reshape(n, k).to(dtype)


def quantize_weight(w: Tensor, spec: TensorQuantSpec) -> QuantizedWeight:
    """MinMax-quantize a linear weight [N, K] per output channel or per group along K.

    Raises:
        ValueError: w is not 2-D, the granularity is not "channel"/"group", the weight holds
            NaN or inf, or the group size does not divide K.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    if spec.granularity == "channel":
        group = k
    elif spec.granularity == "group":
        group = spec.group_size
        if k % group != 0:
            raise ValueError(f"group_size={group} does not divide the weight's input dim K={k}")
    else:
        raise ValueError(
            f"weights are quantized per channel or per group, not {spec.granularity!r}"
        )
    wf = w.detach().to(torch.float32)
    if not bool(torch.isfinite(wf).all()):
        raise ValueError("weight contains NaN or inf; cannot quantize")
    blocks = wf.reshape(n, k // group, group)
    min_val, max_val = torch.aminmax(blocks, dim=-1)
    scale, zp = calculate_qparams(min_val, max_val, spec)
    q = torch.round(blocks / scale.unsqueeze(-1) + zp.to(torch.float32).unsqueeze(-1))
    qdata = torch.clamp(q, spec.qmin, spec.qmax).to(torch.int8).reshape(n, k)
    zero_point = None if spec.symmetric else zp.to(torch.int8)
    return QuantizedWeight(qdata=qdata, scale=scale, zero_point=zero_point, spec=spec)
