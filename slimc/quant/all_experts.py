"""Calibrating MoE expert stacks on every token: each expert sees all of its block's tokens.

With routing, an expert sees only the tokens routed to it, and a calibration set routes few or
none to some experts. `calibrate-all-experts` (msModelSlim and llm-compressor offer the same)
gives every expert every token for its statistics: when the block's first `up` stack is about
to run, its input's distinct rows (one per token, before the per-choice copies) go through every
expert's `up` products and the nodes between them and the `down` products (the gate
activation). Each stack's observer and collector get those rows. The forward itself keeps its
routing, so the layers after the block see the model's real outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from slimc.analyses.experts import Experts, MoeLayer
from slimc.expert_forms import ROW_COPIES
from slimc.linear_select import EXPERT_LINEAR, bias_of, product_path
from slimc.program import Program

log = logging.getLogger(__name__)
aten = torch.ops.aten

Sink = Callable[[fx.Node, torch.Tensor, torch.Tensor], None]
"""Given an expert product, rows of its input and the expert of each row."""

CHUNK_ROWS = 1 << 16
"""Most rows (tokens x experts) run through the experts at once."""


def _copies(x: fx.Node) -> int | None:
    """How many consecutive copies of each token the rows `x` hold (the `repeat_interleave`
    along the rows behind them); None when they are not such copies."""
    node, copies = x, 1
    while node.op == "call_function" and node.target in ROW_COPIES:
        if node.target is aten.repeat_interleave.self_int:
            repeats, dim = node.args[1], node.args[2] if len(node.args) > 2 else None
            if not isinstance(repeats, int) or dim != 0:
                return None
            copies *= repeats
        node = node.args[0]  # type: ignore[assignment]
    return copies


def _between(block: MoeLayer) -> list[fx.Node] | None:
    """The nodes from the block's `up` products to its `down` products' inputs, in graph order;
    None when a `down` input depends on anything but the `up` outputs and constants."""
    ups, found = set(block.up), set()
    stack = [d.args[0] for d in block.down]
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in ups or node in found:
            continue
        if node.op == "get_attr":
            continue
        if node.op != "call_function" or node.target is EXPERT_LINEAR:
            return None  # reaches a graph input or another product: not per (token, expert)
        found.add(node)
        stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(block.up[0].graph.nodes)}
    return sorted(found, key=order.__getitem__)


@dataclass
class AllExpertsFeed:
    """One MoE block calibrated on every token: its products and the nodes between them."""

    block: MoeLayer
    between: list[fx.Node]
    copies: int

    @property
    def trigger(self) -> fx.Node:
        """The product whose hook feeds the whole block (the first `up`)."""
        return self.block.up[0]

    @property
    def products(self) -> list[fx.Node]:
        return [*self.block.up, *self.block.down]

    def feed(self, rows: torch.Tensor, program: Program, sink: Sink) -> None:
        """Run the distinct tokens of `rows` (the trigger's input) through every expert and
        give `sink` each product's input rows with their experts."""
        tokens = rows.reshape(-1, self.copies, rows.shape[-1])[:, 0]
        experts = self.block.experts
        step = max(1, CHUNK_ROWS // max(1, tokens.shape[0]))
        for first in range(0, experts, step):
            chosen = torch.arange(first, min(experts, first + step))
            ids = chosen.repeat_interleave(tokens.shape[0])
            inputs = tokens.repeat(len(chosen), 1)
            env: dict[fx.Node, Any] = {}
            for up in self.block.up:
                sink(up, inputs, ids)
                env[up] = EXPERT_LINEAR(
                    inputs, _value(program, up.args[1]), ids, _bias(program, up)
                )

            def value(arg: Any, env: dict[fx.Node, Any] = env) -> Any:
                return env[arg] if arg in env else _value(program, arg)

            for node in self.between:
                args = fx.node.map_arg(node.args, value)
                kwargs = fx.node.map_arg(node.kwargs, value)
                env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
            for down in self.block.down:
                sink(down, env[down.args[0]], ids)


def _value(program: Program, node: Any) -> Any:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return program.weights.get(str(node.target))
    return node


def _bias(program: Program, product: fx.Node) -> Any:
    bias = bias_of(product)
    return _value(program, bias) if bias is not None else None


def plan_all_experts(program: Program, products: Iterable[fx.Node]) -> list[AllExpertsFeed]:
    """The feeds of the MoE blocks holding any of `products`; a block whose activations
    between `up` and `down` are not a per-row function of the `up` outputs keeps its routing
    (logged)."""
    wanted = set(products)
    feeds = []
    for block in Experts.compute(program).layers:
        if not block.up or not wanted & {*block.up, *block.down}:
            continue
        copies = _copies(block.up[0].args[0])  # type: ignore[arg-type]
        between = _between(block)
        same_input = all(u.args[0] is block.up[0].args[0] for u in block.up)
        if copies is None or between is None or not same_input:
            log.warning(
                "calibrate-all-experts: %s keeps its routing: its experts' input or "
                "activations are not per-token rows this pass can replay",
                block.path,
            )
            continue
        feeds.append(AllExpertsFeed(block, between, copies))
        log.info(
            "calibrate-all-experts: %s: every token through all %d experts of %s",
            block.path,
            block.experts,
            ", ".join(product_path(p) for p in [*block.up, *block.down]),
        )
    return feeds
