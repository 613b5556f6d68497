"""LinearGroups: the subgraphs a smoothing scale can be folded through, discovered from the graph."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from slimc.analyses.channel_probe import probe_channel_maps
from slimc.analyses.group_discovery import norm_linear_group, path_group
from slimc.analyses.group_types import (
    CASTS,
    GROUP_KINDS,
    MOVES,
    NORMS,
    PRIORITY,
    SPLITS,
    GroupKind,
    LinearGroup,
    Refusal,
    ScaleCarrier,
    module_of,
    op_name,
    where,
    where_all,
)
from slimc.expert_forms import EXPERT_LINEAR, ROW_COPIES, source_of
from slimc.ir.builder import tensor_val
from slimc.linear_select import bias_of, float_expert_products, float_linears
from slimc.program import Program

if TYPE_CHECKING:
    from slimc.analysis import AnalysisManager

__all__ = [  # the group vocabulary (slimc.analyses.group_types), where users import it from
    "CASTS",
    "GROUP_KINDS",
    "MOVES",
    "NORMS",
    "PRIORITY",
    "SPLITS",
    "GroupKind",
    "LinearGroup",
    "LinearGroups",
    "Refusal",
    "ScaleCarrier",
    "module_of",
    "names",
    "op_name",
    "where",
    "where_all",
]

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class LinearGroups:
    """Every foldable group of the program, and the candidates refused with their reasons."""

    name = "linear-groups"
    groups: list[LinearGroup] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    @classmethod
    def compute(cls, program: Program, am: AnalysisManager | None = None) -> LinearGroups:
        result = cls()
        by_input: dict[fx.Node, list[fx.Node]] = {}
        for node in float_linears(program):
            x = node.args[0]
            assert isinstance(x, fx.Node)
            by_input.setdefault(x, []).append(node)
        moe_blocks = _moe_block_inputs(program, by_input)
        paths: list[LinearGroup] = []
        for x, (linears, fan_out) in moe_blocks.items():
            group = norm_linear_group(x, linears, result, fan_out)
            if group is not None and not _weights_shared(group, result):
                result.groups.append(group)
        for x, linears in by_input.items():
            group = norm_linear_group(x, linears, result) or path_group(
                x, linears, by_input, result
            )
            if group is None:
                continue
            if _weights_shared(group, result):
                continue
            (paths if group.producer is not None else result.groups).append(group)
        if paths:
            maps = probe_channel_maps(program, paths)
            for group in paths:
                problem = maps.get(group.input)
                if isinstance(problem, str):
                    result.refused.append(Refusal(group.kind, names(group), problem))
                    continue
                group.channel_map, group.rows = problem
                result.groups.append(group)
        order = {n: i for i, n in enumerate(program.graph.nodes)}
        result.groups.sort(key=lambda g: order[g.targets[0]])
        for r in result.refused:
            log.info("linear-groups: not foldable: %s", r)
        return result

    def in_layer_order(self) -> list[LinearGroup]:
        """Groups layer by layer (graph order), inside a layer in folding priority order."""
        layers: dict[str | None, list[LinearGroup]] = {}
        for g in self.groups:
            layers.setdefault(g.layer, []).append(g)
        out: list[LinearGroup] = []
        for groups in layers.values():
            out.extend(sorted(groups, key=lambda g: PRIORITY[g.kind]))
        return out

    def describe(self) -> str:
        """One line per group and per refusal (what `slimc-opt --print-analyses` shows)."""
        lines = [f"linear-groups: {len(self.groups)} groups, {len(self.refused)} refused"]
        for g in self.groups:
            extra = ""
            if g.rows is not None:
                assert g.producer is not None
                total = int(tensor_val(g.producer.args[1]).shape[0])
                extra = f"  [rows {_spans(g.rows)} of {total}"
                if g.channel_map is not None and len(g.channel_map) != g.source_channels():
                    extra += f" -> {len(g.channel_map)} channels"
                extra += "]"
            elif g.channel_map is not None and len(g.channel_map) != g.source_channels():
                extra = f"  [{g.source_channels()} -> {len(g.channel_map)} channels]"
            lines.append(f"  {g.name}{extra}")
        lines.extend(f"  refused {r}" for r in self.refused)
        return "\n".join(lines)


def _spans(rows: torch.Tensor) -> str:
    """`64:96` or `32:48,80:96`: sorted row indices as half-open spans."""
    spans: list[list[int]] = []
    for r in rows.tolist():
        if spans and spans[-1][1] == r:
            spans[-1][1] = r + 1
        else:
            spans.append([r, r + 1])
    return ",".join(f"{a}:{b}" for a, b in spans)


def names(group: LinearGroup) -> tuple[str, ...]:
    """The group's norm or producer, then its linears, as module paths (for refusals)."""
    src = group.carrier.node if group.carrier else group.producer
    nodes = ([src] if src is not None else []) + list(group.targets)
    return tuple(module_of(n) for n in nodes)


def _weights_shared(group: LinearGroup, result: LinearGroups) -> bool:
    """Refuse a group whose scaled weights other nodes also read (tied embeddings)."""
    nodes = list(group.targets) + ([group.producer] if group.producer is not None else [])
    for lin in nodes:
        w = lin.args[1]
        assert isinstance(w, fx.Node)
        others = [u for u in w.users if u is not lin]
        if others:
            result.refused.append(
                Refusal(
                    group.kind,
                    names(group),
                    f"weight {w.target} of {where(lin)} is shared with {where_all(others)} "
                    "(tied weights)",
                )
            )
            return True
        bias = bias_of(lin)
        if isinstance(bias, fx.Node) and len(bias.users) > 1:
            readers = [u for u in bias.users if u is not lin]
            result.refused.append(
                Refusal(
                    group.kind,
                    names(group),
                    f"bias {bias.target} of {where(lin)} is shared with {where_all(readers)}",
                )
            )
            return True
    return False


def _moe_block_inputs(
    program: Program, by_input: dict[fx.Node, list[fx.Node]]
) -> dict[fx.Node, tuple[list[fx.Node], frozenset[fx.Node]]]:
    """The inputs of MoE blocks, taken out of `by_input`: a value whose row copies reach only
    linears and expert stacks (the router and shared experts read its tokens, each routed
    expert stack a copy per chosen expert), as {a linear input: (every reader, the copies)}.
    One scale folded into the norm before it smooths the router and every expert at once."""
    experts = float_expert_products(program)
    blocks: dict[fx.Node, tuple[list[fx.Node], frozenset[fx.Node]]] = {}
    for product in experts:
        root = source_of(product.args[0])  # type: ignore[arg-type]
        copies, readers, todo, ok = set(), [], [root], True
        while todo and ok:
            for user in todo.pop().users:
                if user.op == "call_function" and user.target in ROW_COPIES:
                    copies.add(user)
                    todo.append(user)
                elif user.target is EXPERT_LINEAR and user.args[0] is not None:
                    ok = user in experts and user.args[0] in copies | {root}
                    readers.append(user)
                elif user in by_input.get(user.args[0], ()):  # type: ignore[arg-type]
                    readers.append(user)
                else:
                    ok = False
                if not ok:
                    break
        linear_inputs = [r.args[0] for r in readers if r.target is aten.linear.default]
        if not ok or not linear_inputs or any(x in blocks for x in linear_inputs):
            continue
        key = linear_inputs[0]
        for x in dict.fromkeys(linear_inputs):
            by_input.pop(x, None)  # type: ignore[arg-type]
        readers = list(dict.fromkeys(readers))
        blocks[key] = (readers, frozenset(copies - {key}))  # type: ignore[index]
    return blocks
