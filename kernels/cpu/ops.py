"""CPU kernel ops: quantized linears on PyTorch's native int8 / int4 CPU kernels.

Each op takes the float activation first and its prepared constants after (the lowering
contract of `slimc.kernel`); `lower-cpu` builds the constants with `prepare_*`.

* `slimc::cpu_linear_int8_dynamic`: per-token symmetric activation quantization (compiled),
  the int8 x int8 -> int32 product on the `engine` the lowering chose (oneDNN's prepacked int8
  linear or `torch._int_mm`), the scale epilogue (compiled). Exact against `slimc::quantize_per_token` + `slimc::linear_w8a8`
  up to the float rounding of the epilogue (the integer products are the same).
* `slimc::cpu_linear_int8_dynamic_hadamard`: the same behind an online input rotation
  (`slimc::hadamard`, what `quarot{online-inputs=...}` leaves): the rotation computed as the
  reference computes it (fp32, one matmul per Kronecker factor), its signs / sqrt(n) fused into
  the compiled quantization; the same integer products as the reference.
* `slimc::cpu_linear_int8_static`: the same with a per-tensor static scale and zero point.
* `slimc::cpu_linear_int4_weight`: weight-only int4; `_weight_int4pack_mm_for_cpu` for small M
  (decode), a compiled dequantize to the activation dtype + `F.linear` above `m_threshold`.
  Lossy against the reference by the rounding of scales and zero points to the activation dtype.
* `slimc::cpu_linear_int8_weight`: weight-only symmetric per-channel int8 via
  `_weight_int8pack_mm`.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from slimc.kernel import register_eager_impl
from slimc.kernels.cpu import onednn
from slimc.ops import int8_products
from slimc.ops.packing import unpack_int4
from slimc.quant.qparams import FP32_EPS
from slimc.rotate.hadamard import apply as apply_hadamard

log = logging.getLogger(__name__)

INT4_GROUPS = (32, 64, 128, 256)
"""Group sizes `_weight_int4pack_mm_for_cpu` accepts."""


def _compile(eager_up_to: int = 0, dynamic: bool = True, **options: object):  # noqa: ANN202
    """Run the function torch.compile'd, eagerly while SLIMC_CPU_COMPILE=0, and eagerly when
    its first argument has at most `eager_up_to` elements (a compiled call costs 20-30 us of
    guards and wrapper, more than the eager ops on a few decode rows). `dynamic=False`
    compiles once per input shape (past torch's recompile limit, 8 shapes, it runs eagerly);
    `options` are inductor options."""

    def decorate(fn):  # noqa: ANN001, ANN202
        compiled = None

        @functools.wraps(fn)
        def wrapper(*args):  # noqa: ANN002, ANN202
            nonlocal compiled
            if args[0].numel() <= eager_up_to or os.environ.get("SLIMC_CPU_COMPILE", "1") == "0":
                return fn(*args)
            if compiled is None:
                compiled = torch.compile(fn, dynamic=dynamic, options=options or None)
            return compiled(*args)

        return wrapper

    return decorate


EAGER_QUANTIZE_ELEMENTS = 16384
"""Activations up to this many elements are quantized eagerly (measured crossover, 2 cores:
576 x 32 and 2048 x 8 rows cost the same both ways)."""
EAGER_EPILOGUE_ELEMENTS = 65536
"""Accumulators up to this many elements get the scale epilogue eagerly (crossover measured
between 576 x 64 and 2048 x 64 outputs)."""


@_compile(EAGER_QUANTIZE_ELEMENTS)
def _quantize_rows(x: Tensor, qmax: float, qmin: float) -> tuple[Tensor, Tensor]:
    xf = x.float()
    scale = torch.clamp(xf.abs().amax(dim=-1, keepdim=True) / qmax, min=FP32_EPS)
    return torch.clamp(torch.round(xf / scale), qmin, qmax).to(torch.int8), scale


# the rounding to x's dtype must happen as in eager (inductor otherwise keeps fp32 through it)
@_compile(EAGER_QUANTIZE_ELEMENTS, emulate_precision_casts=True)
def _quantize_rotated_rows(
    y: Tensor, sign_scale: Tensor, dtype: torch.dtype, qmax: float, qmin: float
) -> tuple[Tensor, Tensor]:
    xf = (y * sign_scale).to(dtype).float()
    scale = torch.clamp(xf.abs().amax(dim=-1, keepdim=True) / qmax, min=FP32_EPS)
    return torch.clamp(torch.round(xf / scale), qmin, qmax).to(torch.int8), scale


@_compile(EAGER_QUANTIZE_ELEMENTS)
def _quantize_static(x: Tensor, scale: Tensor, zp: Tensor, qmin: float, qmax: float) -> Tensor:
    q = torch.round(x.float() / scale) + zp.float()
    return torch.clamp(q, qmin, qmax).to(torch.int8)


@_compile(EAGER_EPILOGUE_ELEMENTS)
def _epilogue(acc: Tensor, row_scale: Tensor, w_scale: Tensor, bias: Tensor) -> Tensor:
    return acc.float() * row_scale * w_scale + bias


@_compile(EAGER_EPILOGUE_ELEMENTS)
def _epilogue_static(
    acc: Tensor, zp_term: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor
) -> Tensor:
    return (acc - zp_term).float() * x_scale * w_scale + bias


@_compile(dynamic=False)  # weight shapes: a handful per model; 2x faster than dynamic code
def _dequantize_groups(packed: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """uint8 [N, K/2] nibbles (q + 8) with bf16-style (scale, zero) [N, G]: w = (u-8)*s + z."""
    n, half = packed.shape
    low = (packed & 0x0F).to(scale.dtype)
    high = (packed >> 4).to(scale.dtype)
    u = torch.stack((low, high), dim=-1).reshape(n, scale.shape[1], -1)
    return ((u - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(n, half * 2)


def _kernel_op(name: str, schema: str):  # noqa: ANN202 - decorator factory
    """Define `slimc::<name>` from the function, and register the function as its eager body
    on CPU tensors (KernelLinear then calls it without the dispatcher round trip)."""

    def decorate(fn):  # noqa: ANN001, ANN202
        register_eager_impl(f"slimc::{name}", "cpu", fn)
        return torch.library.custom_op(f"slimc::{name}", fn, mutates_args=(), schema=schema)

    return decorate


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


INT_MM_TRANSPOSED_ROWS = (8, 128)
"""Row counts [lo, hi) for which `(W @ Xq^T)^T` beats `Xq @ W^T` for a row-major W [N, K]
(4096x4096: 8 rows 1.4 vs 3.2 ms, 16 rows 1.0 vs 3.4 ms; 1 row 0.31 ms the other way round;
from 128 rows on the raw products cost the same and the transposed result slows the epilogue)."""


def _int_mm_rows(xq: Tensor, qweight: Tensor) -> Tensor:
    """int32 [M, N] = xq [M, K] @ qweight[N, K]^T: float32 chunks where the CPU lacks VNNI / AMX
    (see `slimc.ops.int8_products`), else `torch._int_mm` in the operand order faster for this M."""
    if int8_products.use_float_path(xq.shape[0], xq.device):
        return int8_products.float_int8_matmul(xq, qweight)
    lo, hi = INT_MM_TRANSPOSED_ROWS
    if lo <= xq.shape[0] < hi:
        return torch._int_mm(qweight, xq.t()).t()
    return torch._int_mm(xq, qweight.t())


def _zero_bias(bias: Tensor | None, n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.float32) if bias is None else bias.float()


_warned_engines: set[str] = set()


def _int8_linear(
    xq: Tensor, row_scale: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor, engine: str
) -> Tensor:
    """fp32 [M, N] = (xq @ qweight^T) * row_scale * w_scale + bias on `engine` (see
    `onednn.ENGINES`); a oneDNN binding runs on `torch._int_mm` for products with fewer than
    `onednn.MIN_OUTPUTS` outputs, and where this torch lacks oneDNN."""
    if engine not in onednn.ENGINES:
        raise ValueError(f"unknown int8 engine {engine!r}; expected one of {onednn.ENGINES}")
    if engine == "onednn" and xq.shape[0] * qweight.shape[0] >= onednn.MIN_OUTPUTS:
        if onednn.available():
            return _epilogue(onednn.matmul(xq, qweight), row_scale, w_scale, bias)
        if engine not in _warned_engines:
            _warned_engines.add(engine)
            log.warning("oneDNN's int8 linear is not available here: running torch._int_mm")
    return _epilogue(_int_mm_rows(xq, qweight), row_scale, w_scale, bias)


# --------------------------------------------------------------------------- int8 x int8


@_kernel_op(
    "cpu_linear_int8_dynamic",
    schema=(
        "(Tensor x, Tensor qweight, Tensor w_scale, Tensor? bias, int qmin, int qmax, "
        'str engine="int_mm") -> Tensor'
    ),
)
def cpu_linear_int8_dynamic(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    qmin: int,
    qmax: int,
    engine: str = "int_mm",
) -> Tensor:
    """Per-token int activations (range [qmin, qmax]) x int8 weights [N, K], scale [N]."""
    xq, row_scale = _quantize_rows(_rows(x), float(qmax), float(qmin))
    return _dynamic_output(x, xq, row_scale, qweight, w_scale, bias, engine)


def _dynamic_output(
    x: Tensor,
    xq: Tensor,
    row_scale: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    engine: str,
) -> Tensor:
    """The dynamic ops' output from the activation codes: shaped like x, in x's dtype."""
    n = qweight.shape[0]
    out = _int8_linear(xq, row_scale, qweight, w_scale, _zero_bias(bias, n), engine)
    return out.to(x.dtype).reshape(*x.shape[:-1], n).contiguous()


@cpu_linear_int8_dynamic.register_fake
def _(x, qweight, w_scale, bias, qmin, qmax, engine="int_mm"):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@_kernel_op(
    "cpu_linear_int8_dynamic_hadamard",
    schema=(
        "(Tensor x, Tensor sign_scale, Tensor qweight, Tensor w_scale, Tensor? bias, int qmin, "
        'int qmax, str engine="int_mm") -> Tensor'
    ),
)
def cpu_linear_int8_dynamic_hadamard(
    x: Tensor,
    sign_scale: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    qmin: int,
    qmax: int,
    engine: str = "int_mm",
) -> Tensor:
    """`cpu_linear_int8_dynamic` of `slimc::hadamard(x, signs)`; sign_scale =
    `slimc.ops.rotate.rotation_scale(signs)` (fp32 [K])."""
    rotated = apply_hadamard(_rows(x).float())
    xq, row_scale = _quantize_rotated_rows(rotated, sign_scale, x.dtype, float(qmax), float(qmin))
    return _dynamic_output(x, xq, row_scale, qweight, w_scale, bias, engine)


@cpu_linear_int8_dynamic_hadamard.register_fake
def _(x, sign_scale, qweight, w_scale, bias, qmin, qmax, engine="int_mm"):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@_kernel_op(
    "cpu_linear_int8_static",
    schema=(
        "(Tensor x, Tensor qweight, Tensor x_scale, Tensor x_zero_point, Tensor w_sum, "
        "Tensor w_scale, Tensor? bias, int qmin, int qmax) -> Tensor"
    ),
)
def cpu_linear_int8_static(
    x: Tensor,
    qweight: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor,
    w_sum: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    qmin: int,
    qmax: int,
) -> Tensor:
    """Per-tensor static int8 activations x int8 weights; `w_sum` [N] = sum_k qweight[n, k]."""
    n = qweight.shape[0]
    scale, zp = x_scale.reshape(()), x_zero_point.reshape(())
    xq = _quantize_static(_rows(x), scale, zp, float(qmin), float(qmax))
    acc = _int_mm_rows(xq, qweight)
    zp_term = zp.to(torch.int32) * w_sum
    out = _epilogue_static(acc, zp_term, scale, w_scale, _zero_bias(bias, n))
    return out.to(x.dtype).reshape(*x.shape[:-1], n).contiguous()


@cpu_linear_int8_static.register_fake
def _(x, qweight, x_scale, x_zero_point, w_sum, w_scale, bias, qmin, qmax):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# --------------------------------------------------------------------------- weight-only


@_kernel_op(
    "cpu_linear_int4_weight",
    schema=(
        "(Tensor x, Tensor int4pack, Tensor scales_and_zeros, Tensor qweight, int group_size, "
        "Tensor? bias, int m_threshold) -> Tensor"
    ),
)
def cpu_linear_int4_weight(
    x: Tensor,
    int4pack: Tensor,
    scales_and_zeros: Tensor,
    qweight: Tensor,
    group_size: int,
    bias: Tensor | None,
    m_threshold: int,
) -> Tensor:
    """int4 weights: `_weight_int4pack_mm_for_cpu` for M <= m_threshold, else dequantize + mm.

    `scales_and_zeros` [K / group_size, N, 2] holds (scale, zero) with w = (u - 8) * scale +
    zero for the stored nibble u; `qweight` is slimc's packed uint8 [N, K / 2] (u = q + 8).
    """
    rows = _rows(x)
    n = qweight.shape[0]
    dtype = scales_and_zeros.dtype
    xin = rows.to(dtype)
    if rows.shape[0] <= m_threshold:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            xin, int4pack, group_size, scales_and_zeros
        )
    else:
        w = _dequantize_groups(qweight, scales_and_zeros[..., 0].t(), scales_and_zeros[..., 1].t())
        out = F.linear(xin, w)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], n).contiguous()


@cpu_linear_int4_weight.register_fake
def _(x, int4pack, scales_and_zeros, qweight, group_size, bias, m_threshold):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@_kernel_op(
    "cpu_linear_int8_weight",
    schema="(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor",
)
def cpu_linear_int8_weight(
    x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None
) -> Tensor:
    """Symmetric per-channel int8 weights [N, K] with scale [N] in the activation dtype."""
    n = qweight.shape[0]
    out = torch.ops.aten._weight_int8pack_mm(_rows(x).to(scale.dtype), qweight, scale)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], n).contiguous()


@cpu_linear_int8_weight.register_fake
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# --------------------------------------------------------------------------- preparation


def int4_group_for(k: int, group_size: int) -> int | None:
    """The int4pack group size for slimc's `group_size` (-1: per channel) on K, or None."""
    if group_size != -1:
        return group_size if group_size in INT4_GROUPS and k % group_size == 0 else None
    fits = [g for g in INT4_GROUPS if k % g == 0]
    return max(fits) if fits else None


def prepare_int4(
    qweight: Tensor, scale: Tensor, zero_point: Tensor | None, group_size: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, int]:
    """(int4pack, scales_and_zeros, kernel group size) from slimc's W4A16 constants.

    Raises:
        ValueError: N is not a multiple of 16 or no supported group size fits K.
    """
    n, k = qweight.shape[0], qweight.shape[1] * 2
    group = int4_group_for(k, group_size)
    if group is None or n % 16:
        raise ValueError(f"int4pack needs N % 16 == 0 and a group in {INT4_GROUPS} dividing K")
    q = unpack_int4(qweight).to(torch.int32)  # [N, K] in [-8, 7]
    reps = group_size // group if group_size != -1 else k // group
    s = scale.float().repeat_interleave(reps, dim=1)
    zp = torch.zeros_like(s) if zero_point is None else zero_point.float()
    zp = zp if zero_point is None else zp.repeat_interleave(reps, dim=1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q + 8).contiguous(), 2)
    sz = torch.stack((s.t(), (-zp * s).t()), dim=-1).to(dtype).contiguous()
    return packed, sz, group
