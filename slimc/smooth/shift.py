"""Folding a per-channel shift of a norm's output into the consumers' biases (exact in float)."""

from __future__ import annotations

import torch
from torch import fx

from slimc.analyses.activation_stats import ActivationStats
from slimc.analyses.linear_groups import LinearGroup
from slimc.ir.builder import call
from slimc.program import LOC_KEY, Program, node_loc

NORM_BIAS_KEY = "slimc_norm_bias"
"""`node.meta` flag on the `add` a shift inserts after a norm (a bias the norm module lacks)."""

aten = torch.ops.aten


def fold_shift(
    program: Program,
    group: LinearGroup,
    shift: torch.Tensor,
    stats: ActivationStats | None = None,
    origin: str | None = None,
) -> fx.Node:
    """Make the group's input `x - shift` and add `W @ shift` to every target's bias.

    Only for norm-linear groups: the subtraction becomes a bias after the norm (a new `add` node
    flagged `slimc_norm_bias`, which `slimc.compile` writes back as a bias on the norm module's
    output). Targets without a bias get one. The group's input becomes the new node, and its
    statistics move with it. Returns the new input node.
    """
    if group.kind != "norm-linear" or group.reads_experts:
        raise ValueError(f"a shift can only be folded into a norm read by linears ({group.name})")
    x = group.input
    shift = shift.detach().double()
    dtype = x.meta["val"].dtype
    loc = node_loc(x) or x.name
    first = min(group.targets, key=lambda t: list(program.graph.nodes).index(t))
    bias_const = program.constant_node(
        program.unique_target(f"{loc}.shift_bias"), (-shift).to(dtype), first
    )
    bias_const.meta[LOC_KEY] = loc
    new_x = call(program, aten.add.Tensor, (x, bias_const), before=first, loc=loc, origin=origin)
    new_x.meta[NORM_BIAS_KEY] = True
    for t in group.targets:
        w = program.weights.get(str(t.args[1].target))  # type: ignore[union-attr]
        delta = w.double() @ shift
        bias = t.args[2] if len(t.args) > 2 else None
        if isinstance(bias, fx.Node):
            b = program.weights.get(str(bias.target))
            program.weights.set(str(bias.target), (b.double() + delta).to(b.dtype))
            new_bias = bias
        else:
            path = node_loc(t) or t.name
            new_bias = program.constant_node(
                program.unique_target(f"{path}.bias"), delta.to(w.dtype), first
            )
            new_bias.meta[LOC_KEY] = path
        t.args = (new_x, t.args[1], new_bias, *t.args[3:])
    if stats is not None and x in stats:
        stats.stats[new_x] = stats.stats.pop(x)
        stats.stats[new_x].subtract(shift)
    group.input = new_x
    return new_x
