"""The vocabulary of the residual stream: norm scales on it, points no weight can rotate,
refusals, and the ops a rotation passes or reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from slimc.analyses.group_types import ScaleCarrier
from slimc.program import node_loc

aten = torch.ops.aten

SHAPE_ONLY = frozenset({aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int})
"""Ops that read only a tensor's shape, never its values."""

CHANNEL_SUMS = frozenset({aten.mean.dim, aten.sum.dim_IntList})
"""Reductions that, over the channel dim of `x * x`, give a rotation-invariant `|x|^2` (RMS)."""


@dataclass
class NormScale:
    """A norm's per-channel scale applied to the stream; fused into the linears reading it."""

    carrier: ScaleCarrier
    readers: list[fx.Node] = field(default_factory=list)


@dataclass(frozen=True)
class OnlinePoint:
    """A value added into the stream that no weight can rotate (e.g. a sandwich norm's output)."""

    value: fx.Node
    add: fx.Node
    reason: str


@dataclass(frozen=True)
class StreamRefusal:
    """A node reading the stream where a rotation would not be exact, and why."""

    node: fx.Node | None
    reason: str

    def __str__(self) -> str:
        if self.node is None:
            return self.reason
        loc = node_loc(self.node)
        return f"{self.node.name}{f' ({loc})' if loc else ''}: {self.reason}"
