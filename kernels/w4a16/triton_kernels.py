"""Triton kernels for W4A16 linears: GEMV/split-K, tiled tensor-core GEMM, and weight dequant.

Weight layout (the `slimc::linear_w4a16` one, no re-layout): `qweight` uint8 [N, K // 2], byte
j of row n holds k = 2j in its low nibble and k = 2j + 1 in its high nibble, each stored as
u = q + 8. Scales are float32 [N, G], zero points int8 [N, G], so w = (u - (8 + zp)) * scale.

Every kernel reads a K step's packed bytes with offset k // 2 and shift (k % 2) * 4 (the two
K rows of a byte hit the same cache line), dequantizes in registers and accumulates in fp32.
A K step lies inside one quantization group unless SCALE_2D is set, in which case scales and
zero points are gathered per element (any group size works, a little slower).

This module imports triton; import it only from `slimc.kernels.w4a16.launcher`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dequant_tile(
    q_ptr,
    s_ptr,
    z_ptr,
    offs_k,
    offs_n,
    k_mask,
    n_mask,
    k0,
    GROUP,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    HAS_ZP: tl.constexpr,
    SCALE_2D: tl.constexpr,
):
    """fp32 weight tile [BLOCK_K, BLOCK_N] = (u - (8 + zp)) * scale for rows offs_n, cols offs_k."""
    mask = k_mask[:, None] & n_mask[None, :]
    packed = tl.load(
        q_ptr + offs_n[None, :] * stride_qn + (offs_k[:, None] // 2) * stride_qk,
        mask=mask,
        other=0,
        eviction_policy="evict_first",
    )
    u = ((packed >> ((offs_k[:, None] % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
    if SCALE_2D:
        g = offs_k[:, None] // GROUP
        s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g * stride_sg, mask=mask, other=0.0)
        zf = 8.0
        if HAS_ZP:
            zp = tl.load(z_ptr + offs_n[None, :] * stride_zn + g * stride_zg, mask=mask, other=0)
            zf = zp.to(tl.float32) + 8.0
    else:
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0)[None, :]
        zf = 8.0
        if HAS_ZP:
            zp = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask, other=0)
            zf = zp.to(tl.float32)[None, :] + 8.0
    return (u - zf) * s


@triton.jit
def w4a16_gemv_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    GROUP,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_om,
    stride_on,
    HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_2D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """One activation row x BLOCK_N outputs per program, CUDA-core FMAs + one tl.sum.

    Grid (cdiv(N, BLOCK_N), SPLIT_K, M). With SPLIT_K > 1 each program reduces every
    SPLIT_K-th K step and atomically adds into a zeroed fp32 output.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for step in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = step * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + row * stride_xm + offs_k * stride_xk,
            mask=k_mask,
            other=0.0,
            eviction_policy="evict_last",
        )
        w = _dequant_tile(
            q_ptr, s_ptr, z_ptr, offs_k, offs_n, k_mask, n_mask, k0, GROUP,
            stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
            HAS_ZP, SCALE_2D,
        )  # fmt: skip
        acc += w * x.to(tl.float32)[:, None]
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:  # noqa: SIM102  (a compile-time branch around a run-time one)
        if pid_k == 0:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + row * stride_om + offs_n * stride_on
    if SPLIT_K == 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(out_ptrs, out, mask=n_mask, sem="relaxed")


@triton.jit
def w4a16_gemm_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    GROUP,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_om,
    stride_on,
    HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_2D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Tiled tl.dot GEMM: x tile [BM, BK] @ dequantized weight tile [BK, BN], fp32 accumulate.

    Grid (cdiv(M, BM) * cdiv(N, BN), SPLIT_K). Output tiles are visited in bands of GROUP_M
    tile rows so consecutive programs share weight tiles in L2. SPLIT_K > 1 accumulates into a
    zeroed fp32 output with atomics. UPCAST_DOT feeds the dot exact fp32 copies of the 16-bit
    operands (used only where the 16-bit dot is unavailable).
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = step * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
            eviction_policy="evict_last",
        )
        w = _dequant_tile(
            q_ptr, s_ptr, z_ptr, offs_k, offs_n, k_mask, n_mask, k0, GROUP,
            stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
            HAS_ZP, SCALE_2D,
        )  # fmt: skip
        if UPCAST_DOT:  # same products and sums, on fp32 operands (see the launcher)
            acc = tl.dot(
                a.to(tl.float32), w.to(a.dtype).to(tl.float32), acc, input_precision="ieee"
            )
        else:
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:  # noqa: SIM102  (a compile-time branch around a run-time one)
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")


@triton.jit
def w4a16_dequant_kernel(
    q_ptr,
    s_ptr,
    z_ptr,
    w_ptr,
    N,
    K,
    GROUP,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_wn,
    stride_wk,
    HAS_ZP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Dense weight w [N, K] in w_ptr's dtype (for the dequantize + cuBLAS path). Grid 2-D."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    w = _dequant_tile(
        q_ptr, s_ptr, z_ptr, offs_k, offs_n, k_mask, n_mask, 0, GROUP,
        stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
        HAS_ZP, True,
    )  # fmt: skip
    tl.store(
        w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
        w.to(w_ptr.dtype.element_ty),
        mask=k_mask[:, None] & n_mask[None, :],
    )
