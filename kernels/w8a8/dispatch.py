"""W8A8 int8 kernel selection: per-device tables keyed by (N, K, bucketed M), and heuristics.

Pure Python (no triton, no CUDA): `select` is what a lowering pass calls at compile time. The
GEMM helpers here (`GemmKernels`) are shared with the fp8 family, which has the same kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimc.kernels.w8a8.tables import KernelFamily, Selection, cdiv, pow2_ceil

__all__ = [
    "AUTO",
    "FAMILY",
    "FUSED",
    "GEMM",
    "KERNELS",
    "GemmKernels",
    "candidates",
    "config_from_values",
    "config_values",
    "fit_config",
    "select",
    "select_explained",
]

GEMM_KEYS = ("block_m", "block_n", "block_k", "split_k", "group_m", "num_warps", "num_stages")
_POW2 = frozenset({"block_m", "block_n", "block_k", "split_k", "group_m", "num_warps"})
_MIN = {"block_m": 16, "block_n": 16, "block_k": 32}  # tl.dot on 8-bit operands


@dataclass(frozen=True, eq=False)
class GemmKernels:
    """The kernels of an 8-bit GEMM family (`<prefix>.gemm`, `.gemm_fused_quant`, `.auto`).

    `gemm` quantizes the activations in a separate kernel, then runs the tiled GEMM;
    `gemm_fused_quant` quantizes each activation tile in the GEMM prologue (one launch, best
    for small M); `auto` is not a kernel: it selects per call (for graphs whose M is not static).
    """

    prefix: str
    config_dir: Path

    @property
    def gemm(self) -> str:
        return f"{self.prefix}.gemm"

    @property
    def fused(self) -> str:
        return f"{self.prefix}.gemm_fused_quant"

    @property
    def auto(self) -> str:
        return f"{self.prefix}.auto"

    @functools.cached_property
    def family(self) -> KernelFamily:
        keys = {self.gemm: GEMM_KEYS, self.fused: GEMM_KEYS, self.auto: ()}
        return KernelFamily(self.prefix, keys, self.config_dir, 2, _POW2, _MIN)

    def fit_config(
        self, kernel: str, config: Mapping[str, Any], n: int, k: int, m: int, sms: int = 132
    ) -> dict[str, int]:
        """Adapt a table config to one problem: blocks no larger than the (padded) shape;
        split_k = 0 becomes enough K splits for about one program per SM (at most 16)."""
        if kernel == self.auto:
            return self.family.check_config(kernel, config)
        cfg = {key: int(v) for key, v in config.items()}
        cfg["block_m"] = max(16, min(cfg["block_m"], pow2_ceil(m)))
        cfg["block_n"] = max(16, min(cfg["block_n"], pow2_ceil(n)))
        cfg["block_k"] = max(32, min(cfg["block_k"], pow2_ceil(k)))
        tiles = cdiv(m, cfg["block_m"]) * cdiv(n, cfg["block_n"])
        k_steps = cdiv(k, cfg["block_k"])
        if cfg["split_k"] == 0:
            split = 1
            while split < 16 and tiles * split < sms and split * 2 <= k_steps:
                split *= 2
            cfg["split_k"] = split
        cfg["split_k"] = max(1, min(cfg["split_k"], pow2_ceil(k_steps)))
        return self.family.check_config(kernel, cfg)

    def select_explained(self, n: int, k: int, m: int | None, device_name: str | None) -> Selection:
        """`select`, plus the reason (which table entry or rule) for the KernelBinding."""
        if n < 1 or k < 1:
            raise ValueError(f"{self.prefix} needs N >= 1 and K >= 1, got N={n}, K={k}")
        if m is None:
            return Selection(self.auto, {}, "M is not static: choose per call from the tables")
        kernel, config, reason, exact = self.family.lookup((n, k), m, device_name)
        return Selection(kernel, self.fit_config(kernel, config, n, k, m), reason, exact)

    def candidates(self, n: int, k: int, m: int) -> list[tuple[str, dict[str, int]]]:
        """A few configs around the M-bucket rules, for autotuning one shape on a GPU."""
        raw: list[tuple[str, dict[str, int]]] = []

        def add(kernel: str, bm: int, bn: int, bk: int, split: int, warps: int, stages: int):
            cfg = {"block_m": bm, "block_n": bn, "block_k": bk, "split_k": split,
                   "group_m": 8, "num_warps": warps, "num_stages": stages}  # fmt: skip
            raw.append((kernel, self.fit_config(kernel, cfg, n, k, m)))

        if m <= 64:
            for bn, bk, split in ((64, 128, 0), (128, 128, 0), (64, 256, 0), (64, 128, 1)):
                add(self.fused, 16 if m <= 16 else 64, bn, bk, split, 4, 3)
            add(self.gemm, 16 if m <= 16 else 64, 64, 128, 0, 4, 3)
        if m > 16:
            for bm, bn, bk, warps, stages in (
                (64, 128, 128, 4, 3),
                (128, 128, 128, 8, 3),
                (128, 256, 64, 8, 3),
                (128, 128, 64, 4, 4),
            ):
                add(self.gemm, bm, bn, bk, 1, warps, stages)
        unique: dict[str, tuple[str, dict[str, int]]] = {}
        for kernel, cfg in raw:
            unique.setdefault(f"{kernel}{sorted(cfg.items())}", (kernel, cfg))
        return list(unique.values())


KERNELS_W8A8 = GemmKernels("w8a8", Path(__file__).resolve().parent / "configs")
FAMILY = KERNELS_W8A8.family
GEMM = KERNELS_W8A8.gemm
FUSED = KERNELS_W8A8.fused
AUTO = KERNELS_W8A8.auto
KERNELS = (GEMM, FUSED)

config_values = FAMILY.config_values
config_from_values = FAMILY.config_from_values
fit_config = KERNELS_W8A8.fit_config
candidates = KERNELS_W8A8.candidates


def select_explained(n: int, k: int, m: int | None, device_name: str | None) -> Selection:
    """`select`, plus the reason for the binding and whether an (N, K) entry matched."""
    return KERNELS_W8A8.select_explained(n, k, m, device_name)


def select(n: int, k: int, m: int | None, device_name: str | None) -> tuple[str, dict[str, int]]:
    """(kernel name, static config) for an [m, k] x [n, k]^T W8A8 linear on `device_name`.

    Used for dynamic (per-token) and static (per-tensor) activations alike. `m=None` (dynamic
    batch) gives `("w8a8.auto", {})`, which selects per call at run time.
    """
    sel = select_explained(n, k, m, device_name)
    return sel.kernel, sel.config
