"""FP8 (e4m3, rowwise-scaled) custom ops and weight helper: the PyTorch reference."""

from __future__ import annotations

import torch
from torch import Tensor

from slimc.quant.qparams import FP32_EPS

__all__ = [
    "E4M3_MAX",
    "linear_fp8_rowwise",
    "quantize_per_token_fp8",
    "quantize_weight_fp8_rowwise",
]

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0


def _rowwise_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (last dim) absmax scaling to e4m3: (q float8_e4m3fn, scale f32 [..., 1]).

    scale = max(absmax / 448, fp32 eps); q = clamp(x / scale, -448, 448) cast to e4m3 (round to
    nearest even), all in float32, so q * scale approximates x.
    """
    xf = x.detach().to(torch.float32)
    scale = torch.clamp(xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX, min=FP32_EPS)
    q = torch.clamp(xf / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def quantize_weight_fp8_rowwise(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A float weight [N, K] -> (qweight float8_e4m3fn [N, K], w_scale float32 [N, 1]).

    One scale per output channel (row), the layout `slimc::linear_fp8_rowwise` takes (K-major,
    what fp8 tensor cores need for the second operand).

    Raises:
        ValueError: weight is not a 2-D floating-point tensor.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D float tensor [N, K], got {weight.dtype} {list(weight.shape)}"
        )
    return _rowwise_fp8(weight)


@torch.library.custom_op(
    "slimc::quantize_per_token_fp8",
    mutates_args=(),
    schema="(Tensor x) -> (Tensor q, Tensor scale)",
)
def quantize_per_token_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token e4m3 quantization (last dim): q float8_e4m3fn [..., K], scale f32 [..., 1]."""
    return _rowwise_fp8(x)


@quantize_per_token_fp8.register_fake
def _(x):
    return (
        x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
    )


def _check_operands(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None) -> None:
    if qweight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"qweight must be torch.float8_e4m3fn, got {qweight.dtype}")
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K], got shape {list(qweight.shape)}")
    n, k = qweight.shape
    torch._check(x.shape[-1] == k, lambda: f"weight input dim K: expected {x.shape[-1]}, got {k}")
    torch._check(
        w_scale.numel() == n, lambda: f"w_scale has shape {list(w_scale.shape)}; expected [{n}, 1]"
    )
    if bias is not None:
        torch._check(
            bias.numel() == n, lambda: f"bias has shape {list(bias.shape)}; expected [{n}]"
        )


def fp8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact a @ b.T for e4m3 a [M, K], b [N, K] -> float32 [M, N] (rounded once).

    Products of two e4m3 values have at most 8 significant bits and are multiples of 2^-18, so
    a float64 accumulation is exact for K < 2^17; the one rounding is the cast to float32.
    """
    return (a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.float32)


@torch.library.custom_op(
    "slimc::linear_fp8_rowwise",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor qweight, Tensor w_scale, Tensor? bias, ScalarType? out_dtype=None) "
        "-> Tensor"
    ),
)
def linear_fp8_rowwise(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Float x -> per-token e4m3 (`slimc::quantize_per_token_fp8`) x e4m3 weight [N, K].

    out = (xq @ qweight^T) * x_scale * w_scale^T (+ bias), the matmul exact, the scaling in
    float32, then cast to out_dtype (default: x's dtype). w_scale is float32 [N, 1]
    (`quantize_weight_fp8_rowwise`).
    """
    _check_operands(x, qweight, w_scale, bias)
    n, k = qweight.shape
    xq, x_scale = _rowwise_fp8(x)
    lead = x.shape[:-1]
    acc = fp8_matmul(xq.reshape(-1, k), qweight).reshape(*lead, n)
    out = acc * x_scale
    out = out * w_scale.to(torch.float32).reshape(-1)
    if bias is not None:
        out = out + bias.to(torch.float32).reshape(-1)
    return out.to(out_dtype or x.dtype).contiguous()


@linear_fp8_rowwise.register_fake
def _(x, qweight, w_scale, bias, out_dtype=None):
    _check_operands(x, qweight, w_scale, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=out_dtype or x.dtype)
