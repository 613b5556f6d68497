"""FP8 (e4m3 rowwise) kernel selection: per-device tables keyed by (N, K, bucketed M).

Pure Python (no triton, no CUDA). The kernels and the selection logic are the 8-bit GEMM ones
of the w8a8 family (`slimc.kernels.w8a8.dispatch.GemmKernels`) with e4m3 operands.
"""

from __future__ import annotations

from pathlib import Path

from slimc.kernels.w8a8.dispatch import GemmKernels
from slimc.kernels.w8a8.tables import Selection

__all__ = [
    "AUTO",
    "FAMILY",
    "FUSED",
    "GEMM",
    "KERNELS",
    "KERNELS_FP8",
    "candidates",
    "config_from_values",
    "config_values",
    "fit_config",
    "select",
    "select_explained",
]

KERNELS_FP8 = GemmKernels("fp8", Path(__file__).resolve().parent / "configs")
FAMILY = KERNELS_FP8.family
GEMM = KERNELS_FP8.gemm
FUSED = KERNELS_FP8.fused
AUTO = KERNELS_FP8.auto
KERNELS = (GEMM, FUSED)

config_values = FAMILY.config_values
config_from_values = FAMILY.config_from_values
fit_config = KERNELS_FP8.fit_config
candidates = KERNELS_FP8.candidates


def select_explained(n: int, k: int, m: int | None, device_name: str | None) -> Selection:
    """`select`, plus the reason for the binding and whether an (N, K) entry matched."""
    return KERNELS_FP8.select_explained(n, k, m, device_name)


def select(n: int, k: int, m: int | None, device_name: str | None) -> tuple[str, dict[str, int]]:
    """(kernel name, static config) for an [m, k] x [n, k]^T fp8 rowwise linear.

    `m=None` (dynamic batch) gives `("fp8.auto", {})`, which selects per call at run time.
    """
    sel = select_explained(n, k, m, device_name)
    return sel.kernel, sel.config
