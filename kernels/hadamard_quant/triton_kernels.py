"""Triton kernel: Hadamard rotation + per-token int8 quantization in one pass over x.

For n = m * 2^k, `slimc.rotate.hadamard(n) = kron(A, S)` with A the m x m (Paley) factor and S
Sylvester's 2^k matrix. Viewing a row x as X [m, 2^k] (row-major), x @ kron(A, S) = A^T X S, so
one program loads BLOCK_M rows, applies A^T (a small dense product: tl.dot on tensor cores, or
CUDA-core FMAs) and then S as an in-register fast Walsh-Hadamard transform (k butterfly stages
on the last axis), multiplies by 1 / sqrt(n) and the signs, rounds to x's dtype (as the unfused
`slimc::hadamard` does), and quantizes per row exactly like `slimc::quantize_per_token`.

The working tile is [MP, BLOCK_M, P2] (MP = m padded to a power of two, P2 = 2^k); padded
rows of A^T are zero, so they do not disturb the row absmax and are never stored. This module
imports triton: import it only from the launcher.
"""

from __future__ import annotations

import triton
import triton.language as tl

from slimc.kernels.w8a8.triton_kernels import FP32_EPS, quantize_values, round_to_dtype

__all__ = ["hadamard_quant_kernel"]


@triton.jit
def _fwht(y, R: tl.constexpr, P2: tl.constexpr, LOG_P2: tl.constexpr):
    """y [R, P2] @ Sylvester(P2) (natural order), butterflies in registers."""
    for j in tl.static_range(LOG_P2):  # stage j pairs elements 2^j apart
        t = tl.reshape(y, (R, P2 >> (j + 1), 2, 1 << j))
        a, b = tl.split(tl.permute(t, (0, 1, 3, 2)))
        t = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        y = tl.reshape(t, (R, P2))
    return y


@triton.jit
def hadamard_quant_kernel(
    x_ptr,
    at_ptr,
    sign_ptr,
    q_ptr,
    s_ptr,
    M,
    stride_xm,
    stride_qm,
    inv_sqrt_n,
    qmin,
    qmax,
    MF: tl.constexpr,
    MP: tl.constexpr,
    KC: tl.constexpr,
    P2: tl.constexpr,
    LOG_P2: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_ID: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """q, scale = quantize_per_token(round_to_x_dtype((x @ kron(A, S)) * sign_scaled)).

    at_ptr: A^T zero-padded to [MP, cdiv(MF, KC) * KC] (x's dtype for 16-bit x, else fp32);
    sign_ptr: the signs [n] (any float dtype). Grid (cdiv(M, BLOCK_M),).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < M
    ia = tl.arange(0, MP)
    ib = tl.arange(0, P2)
    if MF == 1:
        ptrs = x_ptr + rows[None, :, None] * stride_xm + ib[None, None, :]
        y = tl.load(ptrs, mask=r_mask[None, :, None], other=0.0).to(tl.float32)
    elif USE_DOT:
        # A^T [MP, KC] @ X chunk [KC, BLOCK_M * P2] on tensor cores, fp32 accumulate
        acc = tl.zeros((MP, BLOCK_M * P2), dtype=tl.float32)
        ik = tl.arange(0, KC)
        for c in range(0, MF, KC):
            at = tl.load(at_ptr + ia[:, None] * (tl.cdiv(MF, KC) * KC) + (c + ik)[None, :])
            ptrs = x_ptr + rows[None, :, None] * stride_xm + (c + ik)[:, None, None] * P2
            xc = tl.load(
                ptrs + ib[None, None, :],
                mask=r_mask[None, :, None] & ((c + ik) < MF)[:, None, None],
                other=0.0,
            )
            xc = tl.reshape(xc, (KC, BLOCK_M * P2))
            if DOT_PRECISION == "native":
                acc = tl.dot(at, xc, acc)
            else:
                acc = tl.dot(at, xc.to(tl.float32), acc, input_precision=DOT_PRECISION)
        y = tl.reshape(acc, (MP, BLOCK_M, P2))
    else:
        # CUDA-core FMAs: y[a', r, :] += A[a, a'] * x[r, a, :]
        y = tl.zeros((MP, BLOCK_M, P2), dtype=tl.float32)
        stride_at = tl.cdiv(MF, KC) * KC
        for a in range(0, MF):
            col = tl.load(at_ptr + ia * stride_at + a).to(tl.float32)
            xa = tl.load(
                x_ptr + rows[:, None] * stride_xm + a * P2 + ib[None, :],
                mask=r_mask[:, None],
                other=0.0,
            ).to(tl.float32)
            y += col[:, None, None] * xa[None, :, :]
    y = tl.reshape(
        _fwht(tl.reshape(y, (MP * BLOCK_M, P2)), MP * BLOCK_M, P2, LOG_P2), (MP, BLOCK_M, P2)
    )
    a_mask = ia < MF
    sign = tl.load(sign_ptr + ia[:, None] * P2 + ib[None, :], mask=a_mask[:, None], other=0.0)
    y = round_to_dtype(y * inv_sqrt_n * sign.to(tl.float32)[:, None, :], ROUND_ID, USE_RINT)
    amax = tl.max(tl.max(tl.abs(y), axis=2), axis=0)
    scale = tl.maximum(tl.math.div_rn(amax, qmax), FP32_EPS)
    q = quantize_values(tl.math.div_rn(y, scale[None, :, None]), qmin, qmax, False, USE_RINT)
    q_ptrs = q_ptr + rows[None, :, None] * stride_qm + ia[:, None, None] * P2 + ib[None, None, :]
    tl.store(q_ptrs, q, mask=a_mask[:, None, None] & r_mask[None, :, None])
    tl.store(s_ptr + rows, scale, mask=r_mask)
