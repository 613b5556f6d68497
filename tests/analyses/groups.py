"""Helpers of the LinearGroups tests: the tiny models' head layout, groups found in a module,
and a summary of groups by module path."""

from __future__ import annotations

import torch
from torch import nn

from slimc.analyses.linear_groups import LinearGroup, LinearGroups
from slimc.capture import capture
from slimc.program import Program, node_loc

HEAD_DIM, HEADS, KV_HEADS = 16, 4, 2
"""Attention layout of the tiny decoders (tests/models.py): 4 query heads on 2 kv heads."""


def summary(groups: list[LinearGroup]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(kind, module of the carrier norm or producer, target modules) per group."""
    out = []
    for g in groups:
        src = g.carrier.node if g.carrier is not None else g.producer
        assert src is not None
        out.append((g.kind, node_loc(src) or "", tuple(node_loc(t) or "" for t in g.targets)))
    return out


def gqa_map(channels: int = HEADS * HEAD_DIM) -> torch.Tensor:
    """o_proj input channel j <- v_proj output channel of its query head's kv head."""
    j = torch.arange(channels)
    return (j // HEAD_DIM // (HEADS // KV_HEADS)) * HEAD_DIM + j % HEAD_DIM


def groups_of(module: nn.Module, *inputs: torch.Tensor) -> tuple[LinearGroups, Program]:
    """The groups of `module` captured on `inputs` (default: one random [2, 5, 16] input)."""
    torch.manual_seed(0)
    program = capture(module.eval(), inputs or (torch.randn(2, 5, 16),))
    return LinearGroups.compute(program), program
