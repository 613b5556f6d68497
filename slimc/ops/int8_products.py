"""Exact int8 x int8 -> int32 matrix products, on the fastest exact path this CPU has."""

from __future__ import annotations

import functools
import platform

import torch
from torch import Tensor

FLOAT_CHUNK = 1024
"""K-chunk of the float32 path: each chunk's sum of int8 products stays within 1024 * 2^14 = 2^24,
the largest range in which float32 holds every integer, so every partial sum is exact."""

MIN_FLOAT_ROWS = 8
"""From this many rows on, CPUs without VNNI / AMX run the product as float32 matmuls: there
`torch._int_mm` takes a scalar path about 25x slower than float32 (AMD EPYC, AVX2, 512 x 576 x
1536: 242 ms against 9 ms); at one row it is the faster of the two."""


@functools.lru_cache(maxsize=1)
def exact_int8_hardware() -> bool:
    """Whether the CPU accumulates int8 products in int32 in hardware (AVX512-VNNI or AMX on
    x86; Arm builds use exact dot-product instructions)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())


def _ieee_float32_matmul() -> bool:
    """Whether float32 CPU matmuls run in full float32 (no bf16 / tf32 shortcut set by the user)."""
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    precision = getattr(mkldnn_matmul, "fp32_precision", "none")
    return precision in ("none", "ieee") and torch.get_float32_matmul_precision() == "highest"


def float_int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """int32 [M, N] = a [M, K] @ b [N, K]^T through float32 matmuls over K chunks of
    `FLOAT_CHUNK` (exact, see there), or one float64 matmul where float32 matmuls are not IEEE."""
    k = a.shape[1]
    if not _ieee_float32_matmul():
        return (a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.int32)
    out: Tensor | None = None
    for start in range(0, k, FLOAT_CHUNK):
        part = a[:, start : start + FLOAT_CHUNK].float() @ b[:, start : start + FLOAT_CHUNK].float().t()
        out = part.to(torch.int32) if out is None else out.add_(part.to(torch.int32))
    assert out is not None
    return out


def use_float_path(rows: int, device: torch.device) -> bool:
    """Whether `int8_matmul` takes the float path for `rows` rows on `device`."""
    return device.type == "cpu" and rows >= MIN_FLOAT_ROWS and not exact_int8_hardware()


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact a @ b.T for int8 a [M, K], b [N, K] -> int32 [M, N].

    `torch._int_mm` where it is fast and takes the shape; float32 chunks (see `use_float_path`)
    on CPUs without VNNI / AMX; otherwise a float64 matmul, exact since |sum| <= K * 2^14 < 2^53.
    """
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or k == 0 or n == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=a.device)
    if use_float_path(m, a.device):
        return float_int8_matmul(a, b)
    if a.device.type == "cpu" or (a.is_cuda and m > 16 and k % 8 == 0 and n % 8 == 0):
        return torch._int_mm(a.contiguous(), b.t())
    return torch.round(a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.int32)
