"""Re-lay out slimc's fused-linear constants into the argument layouts torch_npu ops require.

slimc stores weights as [N, K] (int8, or int4 packed two per byte as u = q + 8) with scales
[N, G] and integer zero points [N, G]. The torch_npu matmuls take the weight as [K, N] (int4 as
`npu_convert_weight_to_int4pack` words along N), per-output-channel scales as [N], weight-only
antiquant scales/offsets as [G, N] with the offset being MINUS the zero point, and a static
W8A8 layer's dequantization as one `deq_scale` (an int64-encoded float for float16 outputs) plus
an int32 `quant_bias` that folds the activation zero point and the float bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimc.kernels.npu.emulate import (
    emulate_npu_convert_weight_to_int4pack,
    emulate_npu_trans_quant_param,
)
from slimc.ops.packing import unpack_int4

__all__ = [
    "antiquant_params",
    "deq_scale",
    "int4pack_kn",
    "int8_kn",
    "quant_bias",
]


def int8_kn(qweight: Tensor, bits: int) -> Tensor:
    """slimc weight (int8 [N, K] or packed uint8 [N, K // 2]) -> int8 [K, N], contiguous."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    if q.dtype != torch.int8:
        raise ValueError(f"expected an int8 weight, got {q.dtype}")
    return q.t().contiguous()


def int4pack_kn(qweight: Tensor) -> Tensor:
    """slimc packed int4 weight uint8 [N, K // 2] -> int4pack int32 [K, N // 8].

    Raises:
        ValueError: N is not a multiple of 8 (the pack runs along N).
    """
    kn = unpack_int4(qweight).t().contiguous()
    if kn.shape[1] % 8 != 0:
        raise ValueError(f"int4 packing needs N divisible by 8, got N={kn.shape[1]}")
    return emulate_npu_convert_weight_to_int4pack(kn.to(torch.int32))


def antiquant_params(
    scale: Tensor, zero_point: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """[N, G] scale / zero point -> antiquant_scale, antiquant_offset [G, N] in `dtype`.

    The weight-only matmul computes (w + offset) * scale, so the offset is -zero_point.
    """
    s = scale.to(torch.float32).t().contiguous().to(dtype)
    if zero_point is None:
        return s, None
    return s, (-zero_point.to(torch.float32)).t().contiguous().to(dtype)


def deq_scale(x_scale: Tensor, w_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """x_scale * w_scale per output channel: float32 [N], int64-encoded for float16 outputs."""
    s = (x_scale.to(torch.float32).reshape(()) * w_scale.to(torch.float32).reshape(-1)).contiguous()
    if out_dtype == torch.float16:
        return emulate_npu_trans_quant_param(s)
    return s


def quant_bias(
    qweight_kn: Tensor, x_zero_point: Tensor | None, bias: Tensor | None, deq: Tensor
) -> Tensor | None:
    """int32 [N]: round(bias / deq_scale) - zp * sum_k w[k, n] (None when both terms vanish).

    `deq` is the float32 deq_scale (not the int64 encoding).
    """
    n = qweight_kn.shape[1]
    out = torch.zeros(n, dtype=torch.float64)
    if x_zero_point is not None:
        zp = float(x_zero_point.reshape(-1)[0])
        out -= zp * qweight_kn.to(torch.float64).sum(dim=0)
    if bias is not None:
        out += bias.to(torch.float64) / deq.to(torch.float64)
    if x_zero_point is None and bias is None:
        return None
    return torch.round(out).to(torch.int32)
