"""Compilation stages of a slimc program, in the order a pipeline moves through them."""

from __future__ import annotations

import enum


class Stage(enum.IntEnum):
    """Where a program is in the lowering pipeline.

    ATEN: canonical float ATen graph; weights are `get_attr` constants, `aten.linear` kept whole.
    QDQ: chosen linears read `slimc.dequantize_affine` weights (and quantize/dequantize'd inputs).
    FUSED: quantized linears are single `slimc.linear_*` ops on packed weights.
    KERNEL: every `slimc` op is bound to a concrete kernel and static config.
    """

    ATEN = 0
    QDQ = 1
    FUSED = 2
    KERNEL = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Stage:
        try:
            return cls[text.upper()]
        except KeyError:
            names = ", ".join(s.label for s in cls)
            raise ValueError(f"unknown stage {text!r}; expected one of {names}") from None
