"""Choosing linears: module-path globs and the float linears a quantizer can still take."""

from __future__ import annotations

import fnmatch

import torch
from torch import fx

from slimc.ir.builder import is_constant, tensor_val
from slimc.program import Program

aten = torch.ops.aten


def matches(path: str | None, patterns: tuple[str, ...]) -> bool:
    """True when a module path matches one of the globs, whole or as a dotted suffix."""
    if not path:
        return False
    return any(
        fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, "*." + p) for p in patterns
    )


def float_linears(program: Program) -> list[fx.Node]:
    """`aten.linear` nodes whose weight is still a float constant."""
    out = []
    for node in program.graph.find_nodes(op="call_function", target=aten.linear.default):
        w = node.args[1]
        if is_constant(w) and tensor_val(w).is_floating_point() and tensor_val(w).dim() == 2:
            out.append(node)
    return out
