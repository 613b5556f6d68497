"""Channel maps between a producer linear and its consumers, found by running a probe value."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from slimc.program import Program

if TYPE_CHECKING:
    from slimc.analyses.linear_groups import LinearGroup

log = logging.getLogger(__name__)
aten = torch.ops.aten


class _Probe(fx.Interpreter):
    """Runs the graph with each producer's output replaced by its channel numbers (1-based).

    Products on a path pass the producer-side factor through unchanged (they scale elements, they
    do not move channels); attention over a value that is constant along the sequence returns
    that value, so the numbers arrive at the consumer input telling which producer channel feeds
    each consumer channel.
    """

    def __init__(self, gm: fx.GraphModule, producers: set[fx.Node], products: set[fx.Node]) -> None:
        super().__init__(gm)
        self.producers = producers
        self.products = products
        self.seen: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.producers:
            channels = out.shape[-1]
            ids = torch.arange(1, channels + 1, dtype=torch.float64).to(out.dtype)
            out = ids.expand(out.shape).clone()
        elif n in self.products:
            a, b = (self.env[x] if isinstance(x, fx.Node) else x for x in n.args[:2])
            picked = a if n.meta.get("_probe_side") == 0 else b
            out = picked.expand(out.shape).clone()
        return out


def probe_channel_maps(
    program: Program, groups: list[LinearGroup]
) -> dict[fx.Node, torch.Tensor | str]:
    """For each group's input node: the 0-based producer channel of every input channel.

    Returns a reason string instead of a map when the probe shows the path mixes channels.
    """
    from slimc.analyses.group_discovery import _depends_on

    producers = {g.producer for g in groups if g.producer is not None}
    products: set[fx.Node] = set()
    for g in groups:
        node = g.input
        while node is not g.producer:
            if node.target is aten.mul.Tensor:
                side = 0 if _depends_on(node.args[0], g.producer) else 1  # type: ignore[arg-type]
                node.meta["_probe_side"] = side
                products.add(node)
                node = node.args[side]  # type: ignore[assignment]
            elif node.target is aten.scaled_dot_product_attention.default:
                node = node.args[2]  # type: ignore[assignment]
            elif node.target in (aten.matmul.default, aten.bmm.default):
                node = node.args[1]  # type: ignore[assignment]
            else:
                node = node.args[0]  # type: ignore[assignment]
    inputs = {g.input for g in groups}
    interp = _Probe(program.graph_module, producers, products)  # type: ignore[arg-type]
    captured: dict[fx.Node, torch.Tensor] = {}
    original = interp.run_node

    def run_node(n: fx.Node) -> Any:
        out = original(n)
        if n in inputs:
            captured[n] = out.detach()
        return out

    interp.run_node = run_node  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            interp.run(*program.example_inputs)
    finally:
        for n in products:
            n.meta.pop("_probe_side", None)
    result: dict[fx.Node, torch.Tensor | str] = {}
    for g in groups:
        result[g.input] = _decode(captured.get(g.input), g)
    return result


def _decode(value: torch.Tensor | None, group: LinearGroup) -> torch.Tensor | str:
    if value is None:
        return "the probe did not reach the consumer input"
    flat = value.reshape(-1, value.shape[-1]).double()
    ids = flat[0]
    if not torch.isfinite(flat).all() or (flat - ids).abs().max() > 1e-3 * ids.abs().max():
        return "the path between producer and consumer mixes channels"
    rounded = ids.round()
    sources = group.source_channels()
    if (ids - rounded).abs().max() > 1e-2 or rounded.min() < 1 or rounded.max() > sources:
        return "the path between producer and consumer mixes channels"
    channel_map = rounded.long() - 1
    unread = sources - int(torch.unique(channel_map).numel())
    if unread:
        return f"the consumer reads only {sources - unread} of the producer's {sources} channels"
    return channel_map
