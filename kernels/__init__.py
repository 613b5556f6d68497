"""Kernel families that implement `slimc::` ops on accelerators (loaded by lowering passes)."""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

FAMILIES = ("cpu", "npu", "w4a16", "w8a8", "fp8", "hadamard_quant")
"""Every kernel family package; importing one registers its kernel ops."""


def import_families() -> list[str]:
    """Import every kernel family (so a lowered program's kernel ops resolve); returns those
    that imported. A family whose optional dependency is missing is skipped with a debug log."""
    loaded = []
    for family in FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{family}")
        except ImportError as exc:
            log.debug("kernel family %s not importable: %s", family, exc)
            continue
        loaded.append(family)
    return loaded
