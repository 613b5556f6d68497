"""Channel maps between a producer linear and its consumers, found by running a probe value."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from slimc.analyses.group_types import LinearGroup, where_all
from slimc.program import Program

log = logging.getLogger(__name__)
aten = torch.ops.aten


class _Probe(fx.Interpreter):
    """Runs the graph with each producer's output replaced by its channel numbers (1-based).

    Products on a path pass the producer-side factor through unchanged (they scale elements, they
    do not move channels); attention over a value that is constant along the sequence returns
    that value, so the numbers arrive at the consumer input telling which producer channel feeds
    each consumer channel. Every floating value is computed in float64 (constants, inputs and
    dtype arguments are promoted), so channel numbers stay exact in a bf16 or fp16 model.
    """

    def __init__(
        self, program: Program, producers: set[fx.Node], products: set[fx.Node]
    ) -> None:
        super().__init__(program.graph_module)
        self.weights = program.weights
        self.producers = producers
        self.products = products

    def placeholder(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _wide(super().placeholder(target, args, kwargs))

    def get_attr(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _wide(self.weights.get(str(target)))

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args, kwargs = fx.node.map_aggregate((args, kwargs), _wide)  # type: ignore[assignment]
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.producers:
            channels = out.shape[-1]
            ids = torch.arange(1, channels + 1, dtype=torch.float64)
            out = ids.expand(out.shape).clone()
        elif n in self.products:
            a, b = (self.env[x] if isinstance(x, fx.Node) else x for x in n.args[:2])
            picked = a if n.meta.get("_probe_side") == 0 else b
            out = picked.expand(out.shape).clone()
        return out


def _wide(value: Any) -> Any:
    """A floating tensor or dtype as float64; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return torch.float64
    return value


def probe_channel_maps(
    program: Program, groups: list[LinearGroup]
) -> dict[fx.Node, tuple[torch.Tensor, torch.Tensor | None] | str]:
    """For each group's input node: its channel map and the producer rows it reads.

    The map gives the 0-based producer channel of every input channel; the rows are None when
    every producer channel is read, else the sorted rows read (a part of a fused projection).
    Returns a reason string instead when the probe shows the path mixes channels, or when a side
    read of the producer (`group.side_reads`) also sees one of the rows the targets read.
    """
    producers = {g.producer for g in groups if g.producer is not None}
    products: set[fx.Node] = set()
    for g in groups:
        on_path = {g.producer, *g.path}
        for node in g.path:
            if node.target is aten.mul.Tensor:
                node.meta["_probe_side"] = 0 if node.args[0] in on_path else 1
                products.add(node)
    wanted = {g.input for g in groups} | {n for g in groups for n in g.side_reads}
    interp = _Probe(program, producers, products)
    captured: dict[fx.Node, torch.Tensor] = {}
    original = interp.run_node

    def run_node(n: fx.Node) -> Any:
        out = original(n)
        if n in wanted:
            captured[n] = out.detach()
        return out

    interp.run_node = run_node  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            interp.run(*program.example_inputs)
    finally:
        for n in products:
            n.meta.pop("_probe_side", None)
    result: dict[fx.Node, tuple[torch.Tensor, torch.Tensor | None] | str] = {}
    for g in groups:
        decoded = _decode(captured.get(g.input), g)
        if not isinstance(decoded, str):
            problem = _side_read_problem(g, decoded, captured)
            if problem is not None:
                decoded = problem
        result[g.input] = decoded
    return result


def _decode(
    value: torch.Tensor | None, group: LinearGroup
) -> tuple[torch.Tensor, torch.Tensor | None] | str:
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
    rows = torch.unique(channel_map)
    return channel_map, (None if rows.numel() == sources else rows)


def _side_read_problem(
    group: LinearGroup,
    decoded: tuple[torch.Tensor, torch.Tensor | None],
    captured: dict[fx.Node, torch.Tensor],
) -> str | None:
    """Why scaling the rows the targets read would change a side read, or None if it cannot."""
    channel_map, rows = decoded
    read = set((channel_map + 1).tolist())
    bad = []
    for node in group.side_reads:
        value = captured.get(node)
        if value is None:
            bad.append(node)
            continue
        flat = value.detach().reshape(-1).double()
        if flat.numel() == 0:
            continue
        rounded = flat.round()
        if not torch.isfinite(flat).all() or (flat - rounded).abs().max() > 1e-2 or read & set(torch.unique(rounded).long().tolist()):
            bad.append(node)
    if not bad:
        return None
    what = "every channel" if rows is None else f"{len(read)} channels"
    return f"{what} the targets read also reach {where_all(bad)}"
