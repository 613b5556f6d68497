"""Experts: the mixture-of-experts layers of a program, read from its `slimc::expert_linear` ops."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from slimc.expert_forms import ROW_COPIES, source_of
from slimc.ir.builder import tensor_val
from slimc.linear_select import EXPERT_LINEAR, routers_of
from slimc.program import Program, node_loc

if TYPE_CHECKING:
    from slimc.analysis import AnalysisManager

aten = torch.ops.aten


@dataclass
class MoeLayer:
    """One mixture-of-experts block: its router, routed experts' products and shared experts."""

    path: str
    """Module path of the block (the common parent of its router and experts)."""
    experts: int
    top_k: int | None
    router: fx.Node | None
    up: list[fx.Node] = field(default_factory=list)
    """`expert_linear`s reading the block's input (fused gate_up, or gate and up)."""
    down: list[fx.Node] = field(default_factory=list)
    """`expert_linear`s reading the experts' activations."""
    shared: list[fx.Node] = field(default_factory=list)
    """Float `aten.linear`s of the block other than the router (shared experts and their gate)."""

    def describe(self) -> str:
        def weights(nodes: list[fx.Node]) -> str:
            return ", ".join(
                f"{n.args[1].target} {list(tensor_val(n.args[1]).shape)}"  # type: ignore[union-attr]
                for n in nodes
            )

        router = node_loc(self.router) if self.router is not None else "not found"
        top = f"top-{self.top_k}" if self.top_k is not None else "top-k not found"
        lines = [f"  {self.path}: {self.experts} experts, {top}, router {router}"]
        lines.append(f"    up: {weights(self.up)}")
        lines.append(f"    down: {weights(self.down)}")
        if self.shared:
            lines.append(f"    shared: {', '.join(node_loc(n) or n.name for n in self.shared)}")
        return "\n".join(lines)


@dataclass
class Experts:
    """Every MoE block of the program, in graph order (empty for a dense model)."""

    name = "experts"
    layers: list[MoeLayer] = field(default_factory=list)

    @classmethod
    def compute(cls, program: Program, am: AnalysisManager | None = None) -> Experts:
        by_routing: dict[fx.Node, list[fx.Node]] = {}
        for node in program.graph.find_nodes(op="call_function", target=EXPERT_LINEAR):
            by_routing.setdefault(node.args[2], []).append(node)  # type: ignore[arg-type]
        result = cls()
        for ids, products in by_routing.items():
            routers = routers_of([ids])
            router = next(iter(routers)) if len(routers) == 1 else None
            experts = int(tensor_val(products[0].args[1]).shape[0])  # type: ignore[arg-type]
            paths = [node_loc(n) or "" for n in products]
            if router is not None:
                paths.append(node_loc(router) or "")
            path = os.path.commonpath([p.replace(".", "/") for p in paths]).replace("/", ".")
            layer = MoeLayer(path, experts, _top_k(ids), router)
            block_input = source_of(router.args[0]) if router is not None else None  # type: ignore[arg-type]
            for node in products:
                reads_input = source_of(node.args[0]) is block_input  # type: ignore[arg-type]
                (layer.up if reads_input else layer.down).append(node)
            layer.shared = [
                n
                for n in program.graph.find_nodes(op="call_function", target=aten.linear.default)
                if n is not router and (node_loc(n) or "").startswith(path + ".")
            ]
            result.layers.append(layer)
        return result

    def describe(self) -> str:
        """One block per MoE layer (what `slimc-opt --print-analyses` shows)."""
        lines = [f"experts: {len(self.layers)} MoE layers"]
        lines.extend(layer.describe() for layer in self.layers)
        return "\n".join(lines)


def _top_k(ids: fx.Node) -> int | None:
    """How many experts each token is routed to: the last dim of the [tokens, k] expert-choice
    tensor the flat ids are a reshape of (`aten.topk`'s, or a hand-written router's)."""
    node = ids
    while node.op == "call_function" and node.target in ROW_COPIES:
        node = node.args[0]  # type: ignore[assignment]
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 2 and isinstance(val.shape[-1], int):
            return int(val.shape[-1])
    return None
