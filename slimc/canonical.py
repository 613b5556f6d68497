"""The canonical ATen form: what `capture` and the `canonicalize` pass bring every graph to.

A plain function, so capture (and loading a `.pt2`, and the torch.compile backend) canonicalize
without building a pass manager.
"""

from __future__ import annotations

import torch
from torch import fx

from slimc.expert_forms import canonicalize_experts
from slimc.ir.verifier import verify
from slimc.linear_forms import canonicalize_linears
from slimc.program import Program

aten = torch.ops.aten

NAME = "canonicalize"
"""The pass's name: its statistics are counted under it, whoever runs it."""

_ASSERTS = frozenset(
    {
        aten._assert_tensor_metadata.default,
        aten._assert_scalar.default,
        aten.sym_constrain_range_for_size.default,
    }
)


def _same_as_input(node: fx.Node) -> fx.Node | None:
    """The input a no-op node returns unchanged (same dtype/device/shape), else None."""
    if node.target not in (
        aten.to.dtype,
        aten.to.dtype_layout,
        aten.to.device,
        aten.alias.default,
        aten.detach.default,
        aten.dropout.default,
        aten.clone.default,
    ):
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return None
    if node.target is aten.dropout.default and not (len(node.args) > 2 and node.args[2] is False):
        return None
    a, b = src.meta.get("val"), node.meta.get("val")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    if a.dtype != b.dtype or a.device != b.device or a.shape != b.shape:
        return None
    if node.target is aten.to.dtype_layout and node.kwargs.get("copy", False):
        return None
    return src


def _stat(program: Program, key: str, amount: int) -> None:
    bucket = program.statistics.setdefault(NAME, {})
    bucket[key] = bucket.get(key, 0) + amount


def canonicalize(program: Program, *, check: bool = True) -> int:
    """Remove export guards, runtime asserts and no-op casts; rewrite linears; drop dead code.

    Linears computed as matmul / mm / addmm on a constant 2-D weight become `aten.linear`
    (see `slimc.linear_forms`), and MoE experts' gathered products `slimc::expert_linear`
    (see `slimc.expert_forms`). Exact. With `check`, the IR verifier runs afterwards, as it
    does after every pass a pass manager runs.

    Returns:
        How many nodes were removed or rewritten (0: the program was already canonical).
    """
    graph = program.graph
    changed = 0
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
            if hasattr(program.graph_module, str(node.target)):
                delattr(program.graph_module, str(node.target))
            changed += 1
        elif node.op == "call_function" and node.target in _ASSERTS and not node.users:
            graph.erase_node(node)
            changed += 1
        elif node.op == "call_function" and (src := _same_as_input(node)) is not None:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            changed += 1
    linears = canonicalize_linears(program)
    if linears:
        _stat(program, "linears recognised from matmul/addmm", linears)
    experts = canonicalize_experts(program)
    if experts:
        _stat(program, "expert products recognised from gathered bmm", experts)
        linears += experts
    before = len(graph.nodes)
    graph.eliminate_dead_code()
    changed += linears + before - len(graph.nodes)
    if changed:
        program.recompile()
        _stat(program, "removed-nodes", changed)
    if check:
        verify(program, after=NAME)
    return changed
