"""Triton kernels for 8-bit activations x 8-bit weights (int8 and fp8 e4m3), and their quantizers.

* `quant_per_token_kernel`: dynamic symmetric per-token quantization (int8 or e4m3).
* `quant_static_kernel`: static per-tensor affine quantization (`slimc::quantize_affine`).
* `scaled_mm_kernel`: a [M, K] x [N, K]^T tl.dot GEMM on 8-bit operands (int8 -> int32 or
  e4m3 -> fp32 accumulation) with the per-token x per-channel scale epilogue and bias. The
  activation tile is either already quantized, or quantized in the prologue from the float input
  (per token: a first pass over K computes the row absmax; static: one scale and zero point).

qmin / qmax are passed as floats (integer values). Rounding matches the PyTorch reference bit
for bit: true IEEE division (`div_rn`, never a reciprocal), round-half-to-even, clamp, and the
scale `max(absmax / qmax, fp32 eps)`. The e4m3
cast is done by rounding onto the e4m3 grid in fp32 first, so the final conversion is exact
whatever rounding mode the backend uses for it.

Weights are [N, K] row-major (K-major, what fp8 tensor cores need); the weight tile is read as a
[BLOCK_K, BLOCK_N] view of it. This module imports triton: import it only from the launchers.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

FP32_EPS = tl.constexpr(1.1920928955078125e-07)
E4M3_MAX = tl.constexpr(448.0)

__all__ = [
    "quant_per_token_kernel",
    "quant_static_kernel",
    "scaled_mm_kernel",
    "round_half_even",
    "round_to_dtype",
    "quantize_values",
]


@triton.jit
def round_half_even(v, USE_RINT: tl.constexpr):
    """Round to the nearest integer, ties to even (torch.round). Needs |v| < 2^22."""
    if USE_RINT:
        return libdevice.rint(v)
    else:  # the interpreter has no libdevice: 1.5 * 2^23 pushes the fraction out of fp32
        r = (v + 12582912.0) - 12582912.0
        return tl.where(r == 0.0, v * 0.0, r)  # keep the sign of zero, as rint does


@triton.jit
def round_to_e4m3(v, USE_RINT: tl.constexpr):
    """v clamped to +-448 and rounded (ties to even) onto the float8 e4m3 grid, as fp32."""
    v = tl.minimum(tl.maximum(v, -E4M3_MAX), E4M3_MAX)
    exp = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
    exp = tl.maximum(exp, 127 - 6)  # subnormals share the step of the 2^-6 binade
    step = ((exp - 3) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3): 3 mantissa bits
    inv_step = ((254 - (exp - 3)) << 23).to(tl.float32, bitcast=True)
    return round_half_even(v * inv_step, USE_RINT) * step


@triton.jit
def round_to_dtype(v, DTYPE_ID: tl.constexpr, USE_RINT: tl.constexpr):
    """fp32 v rounded (ties to even) to the precision of bfloat16 (DTYPE_ID 1) or float16 (2),
    still as fp32, so the final cast is exact on every backend; DTYPE_ID 0: v unchanged."""
    if DTYPE_ID == 1:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE_ID == 2:
        exp = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
        exp = tl.maximum(exp, 127 - 14)  # float16 subnormals: step 2^-24
        step = ((exp - 10) << 23).to(tl.float32, bitcast=True)
        inv_step = ((254 - (exp - 10)) << 23).to(tl.float32, bitcast=True)
        return round_half_even(v * inv_step, USE_RINT) * step
    else:
        return v


@triton.jit
def quantize_values(v, qmin, qmax, FP8: tl.constexpr, USE_RINT: tl.constexpr):
    """Scaled fp32 values -> int8 codes (clamp to [qmin, qmax], round) or e4m3 values."""
    if FP8:
        return round_to_e4m3(v, USE_RINT).to(tl.float8e4nv)
    else:
        v = tl.minimum(tl.maximum(v, qmin), qmax)
        return round_half_even(v, USE_RINT).to(tl.int8)


@triton.jit
def _row_scale(
    x_ptr,
    offs_m,
    m_mask,
    K,
    stride_xm,
    stride_xk,
    qmax,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """max(absmax(row) / qmax, eps) for the BLOCK_M rows offs_m, one pass over K (fp32)."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    return tl.maximum(tl.math.div_rn(amax, qmax), FP32_EPS)


@triton.jit
def quant_per_token_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    stride_qk,
    qmin,
    qmax,
    FP8: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """q = quantize(x / scale), scale = max(absmax / qmax, eps) per row. Grid (cdiv(M, BM),)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    scale = _row_scale(x_ptr, offs_m, m_mask, K, stride_xm, stride_xk, qmax, BLOCK_M, BLOCK_K)
    tl.store(s_ptr + offs_m, scale, mask=m_mask)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0
        )
        v = tl.math.div_rn(x.to(tl.float32), scale[:, None])
        q = quantize_values(v, qmin, qmax, FP8, USE_RINT)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, q, mask=mask)


@triton.jit
def quant_static_kernel(
    x_ptr,
    s_ptr,
    z_ptr,
    q_ptr,
    numel,
    qmin,
    qmax,
    HAS_ZP: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """q = clamp(round(x / scale + zp), qmin, qmax) with one scale / zero point (contiguous x)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.math.div_rn(x, tl.load(s_ptr).to(tl.float32))
    if HAS_ZP:
        v = v + tl.load(z_ptr).to(tl.float32)
    q = quantize_values(v, qmin, qmax, False, USE_RINT)
    tl.store(q_ptr + offs, q, mask=mask)


@triton.jit
def scaled_mm_kernel(
    a_ptr,
    a_scale_ptr,
    a_zp_ptr,
    b_ptr,
    b_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_om,
    stride_on,
    qmin,
    qmax,
    A_MODE: tl.constexpr,
    A_SCALE_PER_ROW: tl.constexpr,
    HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP8: tl.constexpr,
    USE_RINT: tl.constexpr,
    OUT_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = (A @ B^T) * a_scale[:, None] * b_scale[None, :] + bias on 8-bit A and B.

    A_MODE 0: A is already quantized (int8 / e4m3), a_scale per row or one value, and for int8
    an optional per-tensor zero point (folded as acc - zp * sum_k B). A_MODE 1: A is float,
    quantized per token here (symmetric). A_MODE 2: A is float, quantized with one static scale
    and zero point here (int8 only). Grid (cdiv(M, BM) * cdiv(N, BN), SPLIT_K); tiles are
    visited in bands of GROUP_M tile rows for L2 reuse; SPLIT_K > 1 adds fp32 partial results
    atomically into a zeroed fp32 output (bias added by the first split). OUT_ROUND: see
    `round_to_dtype` (the output's dtype, for an exact final cast).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * tiles_n)
    band_start = band * GROUP_M
    band_rows = tl.minimum(tiles_m - band_start, GROUP_M)
    within = pid - band * GROUP_M * tiles_n
    pid_m = band_start + within % band_rows
    pid_n = within // band_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    if A_MODE == 1:
        a_scale = _row_scale(a_ptr, offs_m, m_mask, K, stride_am, stride_ak, qmax, BLOCK_M, BLOCK_K)
    elif A_MODE == 2:
        a_scale = tl.load(a_scale_ptr).to(tl.float32)
    if HAS_ZP:
        zp = tl.load(a_zp_ptr).to(tl.int32)
        w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)

    if FP8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for step in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if A_MODE == 1:
            v = tl.math.div_rn(a.to(tl.float32), a_scale[:, None])
            a = quantize_values(v, qmin, qmax, FP8, USE_RINT)
        elif A_MODE == 2:
            v = tl.math.div_rn(a.to(tl.float32), a_scale)
            if HAS_ZP:
                v = v + zp.to(tl.float32)
            a = quantize_values(v, qmin, qmax, False, USE_RINT)
        b = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        if FP8:  # noqa: SIM108  (a compile-time branch; two different dot signatures)
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if HAS_ZP:
            w_sum += tl.sum(b.to(tl.int32), axis=0)

    if HAS_ZP:
        acc = acc - zp * w_sum[None, :]
    out = acc.to(tl.float32)
    if A_MODE == 0:
        if A_SCALE_PER_ROW:
            a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=1.0).to(tl.float32)
            out = out * a_scale[:, None]
        else:
            out = out * tl.load(a_scale_ptr).to(tl.float32)
    elif A_MODE == 1:
        out = out * a_scale[:, None]
    else:
        out = out * a_scale
    b_scale = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = out * b_scale[None, :]
    if HAS_BIAS:  # noqa: SIM102  (a compile-time branch around a run-time one)
        if pid_k == 0:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        out = round_to_dtype(out, OUT_ROUND, USE_RINT)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, out, mask=out_mask, sem="relaxed")
