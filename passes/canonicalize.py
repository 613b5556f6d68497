"""canonicalize: bring captured graphs to the one canonical ATen form passes pattern-match on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from slimc.analysis import AnalysisManager
from slimc.linear_forms import canonicalize_linears
from slimc.pass_base import Pass, PassResult, Preserved
from slimc.program import Program
from slimc.stage import Stage

aten = torch.ops.aten

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


@dataclass(frozen=True, kw_only=True)
class Canonicalize(Pass):
    """Remove export guards, runtime asserts and no-op casts; rewrite linears; drop dead code.

    Linears computed as matmul / mm / addmm on a constant 2-D weight (with or without a
    transpose, a bias add, or the reshapes around `addmm`: GPT-2's `Conv1D`, `FalconLinear`)
    become `aten.linear(x, weight[out, in], bias)`; a weight stored [in, out] is transposed in
    the program (write-back stores it back in the model's layout).

    Exact: every removed node is an assertion, a guard call or returns its input unchanged, and
    a rewritten linear computes the same product.
    """

    name = "canonicalize"
    accepts = frozenset(Stage)

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
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
            self.stat(program, "linears recognised from matmul/addmm", linears)
        before = len(graph.nodes)
        graph.eliminate_dead_code()
        changed += linears + before - len(graph.nodes)
        if changed:
            program.recompile()
            self.stat(program, "removed-nodes", changed)
        return PassResult(
            changed=bool(changed), preserved=Preserved.everything() if not changed else Preserved()
        )
