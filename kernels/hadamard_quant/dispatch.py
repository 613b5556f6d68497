"""Hadamard + quantization kernel selection: per-device tables keyed by (N, bucketed M).

Pure Python (no triton, no CUDA): `select(n, m, device_name)` is what a lowering pass calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slimc.kernels.w8a8.tables import KernelFamily, Selection, pow2_ceil
from slimc.rotate.hadamard import construction

__all__ = [
    "AUTO",
    "FAMILY",
    "FUSED",
    "KERNELS",
    "MAX_TILE",
    "candidates",
    "config_from_values",
    "config_values",
    "factor_orders",
    "fit_config",
    "select",
    "select_explained",
]

FUSED = "hadamard_quant.fused"
AUTO = "hadamard_quant.auto"
"""Not a kernel: pick the config at run time from the tables (for graphs whose M is not static)."""
KERNELS = (FUSED,)
MAX_TILE = 16384
"""Largest fp32 working tile (MP * BLOCK_M * P2 elements) one program holds in registers."""
DOT_K = 16
"""Chunk of the m factor per tl.dot (A^T is padded to a multiple of it)."""

FAMILY = KernelFamily(
    "hadamard_quant",
    {FUSED: ("block_m", "use_dot", "num_warps"), AUTO: ()},
    Path(__file__).resolve().parent / "configs",
    1,
    frozenset({"block_m", "num_warps"}),
    {"use_dot": 0},
)
config_values = FAMILY.config_values
config_from_values = FAMILY.config_from_values


def factor_orders(n: int) -> tuple[int, int]:
    """(m, 2^k) with `hadamard(n) = kron(A_m, Sylvester(2^k))` as slimc.rotate builds it.

    Raises:
        ValueError: no Hadamard construction is known for n.
    """
    factors = construction(n)
    if factors and factors[-1].kind == "sylvester":
        p2 = factors[-1].order
        return n // p2, p2
    return n, 1


def fit_config(config: Mapping[str, Any], n: int, m: int) -> dict[str, int]:
    """Adapt a table config to (n, m): the tile fits MAX_TILE, use_dot only where tl.dot fits
    (an m factor of at least 12, BLOCK_M * 2^k >= 16)."""
    mf, p2 = factor_orders(n)
    mp = pow2_ceil(mf)
    cfg = {key: int(v) for key, v in config.items()}
    block = max(1, min(cfg["block_m"], pow2_ceil(m)))
    while block > 1 and mp * block * p2 > MAX_TILE:
        block //= 2
    use_dot = 1 if cfg["use_dot"] and mf > 1 and mp >= 16 else 0
    if use_dot and block * p2 < 16:
        block = pow2_ceil(-(-16 // p2))
    cfg.update(block_m=block, use_dot=use_dot)
    return FAMILY.check_config(FUSED, cfg)


def select_explained(n: int, m: int | None, device_name: str | None) -> Selection:
    """`select`, plus the reason (which table entry or rule) for the binding."""
    factor_orders(n)  # a clear error for an n without a Hadamard construction
    if m is None:
        return Selection(AUTO, {}, "M is not static: choose per call from the tables")
    kernel, config, reason, exact = FAMILY.lookup((n,), m, device_name)
    return Selection(kernel, fit_config(config, n, m), reason, exact)


def select(n: int, m: int | None, device_name: str | None) -> tuple[str, dict[str, int]]:
    """(kernel name, static config) for rotating + quantizing m rows of width n.

    `m=None` (dynamic batch) gives `("hadamard_quant.auto", {})`, chosen per call at run time.
    """
    sel = select_explained(n, m, device_name)
    return sel.kernel, sel.config


def candidates(n: int, m: int) -> list[tuple[str, dict[str, int]]]:
    """A few configs for autotuning one (n, m) on a GPU."""
    out: dict[str, tuple[str, dict[str, int]]] = {}
    for block in (1, 2, 4, 8):
        for use_dot in (0, 1):
            for warps in (4, 8):
                cfg = fit_config({"block_m": block, "use_dot": use_dot, "num_warps": warps}, n, m)
                out.setdefault(str(sorted(cfg.items())), (FUSED, cfg))
    return list(out.values())
