"""Helpers for passes that insert nodes: typed (`meta["val"]`), located and with provenance."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from slimc.program import LOC_KEY, Program, node_loc


def infer_val(program: Program, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run `target` on the fake values of its arguments to get the new node's `meta["val"]`."""

    def val(a: Any) -> Any:
        return a.meta["val"] if isinstance(a, fx.Node) else a

    fargs = fx.node.map_aggregate(args, val)
    fkwargs = fx.node.map_aggregate(kwargs, val)
    with program.fake_mode:
        return target(*fargs, **fkwargs)


def call(
    program: Program,
    target: Any,
    args: tuple[Any, ...],
    *,
    kwargs: dict[str, Any] | None = None,
    before: fx.Node,
    loc: str | None = None,
    origin: str | None = None,
) -> fx.Node:
    """Insert `target(*args)` before `before`, with its type, location and creating pass."""
    kwargs = kwargs or {}
    with program.graph.inserting_before(before):
        node = program.graph.call_function(target, args, kwargs)
    node.meta["val"] = infer_val(program, target, args, kwargs)
    where = loc if loc is not None else before.meta.get(LOC_KEY)
    if where is not None:
        node.meta[LOC_KEY] = where
    if "nn_module_stack" in before.meta:
        node.meta["nn_module_stack"] = before.meta["nn_module_stack"]
    if origin:
        node.meta["slimc_from"] = origin
    return node


def getitems(program: Program, node: fx.Node, count: int, before: fx.Node) -> list[fx.Node]:
    """`getitem` nodes for the first `count` results of a multi-output node."""
    out = []
    for i in range(count):
        with program.graph.inserting_before(before):
            item = program.graph.call_function(operator.getitem, (node, i))
        item.meta["val"] = node.meta["val"][i]
        if LOC_KEY in node.meta:
            item.meta[LOC_KEY] = node.meta[LOC_KEY]
        out.append(item)
    return out


def is_constant(node: Any) -> bool:
    """Whether `node` reads a constant of the weight store (a `get_attr` node)."""
    return isinstance(node, fx.Node) and node.op == "get_attr"


def constant_value(
    program: Program, arg: Any, *, error: type[Exception] = ValueError
) -> torch.Tensor | None:
    """The tensor constant argument `arg` reads; None for an absent (None) argument.

    Raises:
        error: `arg` is neither None nor a constant.
    """
    if arg is None:
        return None
    if not is_constant(arg):
        raise error(f"argument {arg} is not a constant")
    return program.weights.get(str(arg.target))


def constant_arg(node: fx.Node, index: int) -> fx.Node | None:
    """The constant node at position `index` of `node`'s arguments, else None."""
    arg = node.args[index] if len(node.args) > index else None
    return arg if is_constant(arg) else None


def new_constant(program: Program, node: fx.Node, suffix: str, value: torch.Tensor) -> fx.Node:
    """A new constant `<node's module path>.<suffix>` holding `value`, placed for `node`."""
    target = program.unique_target(f"{node_loc(node) or node.name}.{suffix}")
    return program.constant_node(target, value, node)


def tensor_val(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise TypeError(f"node {node.name} has no tensor type")
    return val
