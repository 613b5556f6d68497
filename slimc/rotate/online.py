"""Online rotations: `slimc.hadamard` nodes for stream values that no weight can rotate."""

from __future__ import annotations

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc::hadamard)
from slimc.analyses.residual_stream import OnlinePoint
from slimc.ir.builder import call
from slimc.program import LOC_KEY, Program, node_loc
from slimc.rotate.fold import WEIGHT, rotate_input
from slimc.rotate.hadamard import hadamard

ONLINE_ROTATION_KEY = "slimc_online_rotation"
"""`node.meta` flag on a `slimc.hadamard` quarot inserted (written back as a module wrapper)."""

ONLINE_INPUT_ROTATION_KEY = "slimc_online_input_rotation"
"""`node.meta` flag on a `slimc.hadamard` rotating a linear's input (written back around it)."""


def insert_online_rotation(
    program: Program, point: OnlinePoint, signs: torch.Tensor, origin: str | None = None
) -> fx.Node:
    """Rotate `point.value` by `random_hadamard(n)` (given by its `signs`) before it is added.

    The new node carries the value's module path, so `slimc.compile` can wrap that module with
    `slimc.nn.HadamardRotation`. Returns the `slimc.hadamard` node.
    """
    value, add = point.value, point.add
    loc = node_loc(value) or value.name
    dtype = value.meta["val"].dtype
    const = program.constant_node(
        program.unique_target(f"{loc}.rotation_signs"), signs.to(dtype), before=add
    )
    const.meta[LOC_KEY] = loc
    node = call(
        program,
        torch.ops.slimc.hadamard.default,
        (value, const),
        before=add,
        loc=loc,
        origin=origin,
    )
    node.meta[ONLINE_ROTATION_KEY] = True
    add.replace_input_with(value, node)
    return node


def insert_input_rotation(
    program: Program, linear: fx.Node, signs: torch.Tensor, origin: str | None = None
) -> fx.Node:
    """Rotate a linear's input at run time by `Q = random_hadamard(k)` and fold `Q` into W.

    `x -> x Q` (a `slimc.hadamard` node carrying the linear's module path) and `W -> W Q`, so
    the linear computes `x Q Q^T W^T = x W^T`: exact. Returns the `slimc.hadamard` node.
    """
    x = linear.args[0]
    assert isinstance(x, fx.Node)
    loc = node_loc(linear) or linear.name
    k = signs.shape[0]
    dtype = x.meta["val"].dtype
    const = program.constant_node(
        program.unique_target(f"{loc}.input_rotation_signs"), signs.to(dtype), before=linear
    )
    const.meta[LOC_KEY] = loc
    node = call(
        program, torch.ops.slimc.hadamard.default, (x, const), before=linear, loc=loc, origin=origin
    )
    node.meta[ONLINE_INPUT_ROTATION_KEY] = True
    linear.replace_input_with(x, node)
    q = (hadamard(k) / k**0.5) * signs.to(torch.float64)
    assert linear.args[WEIGHT] is not None
    rotate_input(program, linear, q)
    return node
