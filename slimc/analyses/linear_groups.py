"""LinearGroups: the subgraphs a smoothing scale can be folded through, discovered from the graph."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import fx

from slimc.ir.builder import is_constant, tensor_val
from slimc.program import Program, layer_of, node_loc

if TYPE_CHECKING:
    from slimc.analysis import AnalysisManager

log = logging.getLogger(__name__)
aten = torch.ops.aten

GroupKind = Literal["norm-linear", "ov", "up-down", "linear-linear"]
GROUP_KINDS: tuple[GroupKind, ...] = ("norm-linear", "ov", "up-down", "linear-linear")
PRIORITY: dict[str, int] = {"up-down": 0, "ov": 1, "linear-linear": 2, "norm-linear": 3}
"""Order of folding inside one layer (msModelSlim's SUBGRAPH_PRIORITY)."""

CASTS = frozenset({aten.type_as.default, aten._to_copy.default, aten.to.dtype, aten.clone.default})
"""Ops that pass values through unchanged per channel (dtype casts, copies)."""

MOVES = frozenset(
    {
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.transpose.int,
        aten.permute.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.expand.default,
        aten.slice.Tensor,
        aten.contiguous.default,
        *CASTS,
    }
)
"""Ops that only move, replicate or cast elements: per-channel scales travel through them."""

NORMS = frozenset({aten.layer_norm.default, aten.rms_norm.default})

SPLITS = frozenset(
    {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int}
)
"""Ops whose parts (`getitem`) are slices of their input: a fused qkv's v part is one."""


@dataclass(frozen=True)
class ScaleCarrier:
    """Where a norm-linear group's `1/s` is folded: a per-channel constant and optional bias.

    `weight` is a constant node of the channel size; `offset` is a scalar added to it before use
    (`x * (1 + w)` norms have offset 1.0); `bias` is a constant added after the multiply.
    """

    node: fx.Node
    weight: fx.Node
    offset: float = 0.0
    bias: fx.Node | None = None


@dataclass
class LinearGroup:
    """Linears that read one activation, and where a per-channel scale of it can be folded.

    For `norm-linear`, `carrier` is the norm's weight; the input channels are scaled directly.
    For the other kinds, `producer` is the linear whose output rows are divided by the scale and
    `channel_map[j]` is the producer output channel (weight row) that feeds input channel `j` of
    the targets (for grouped-query attention several o_proj channels share one v_proj channel).
    When the targets read only part of the producer's output (the v part of a fused qkv, the up
    half of a fused gate_up), `rows` lists the rows they read, in order: the scale has one entry
    per listed row and only those rows are divided. `path` holds the nodes between producer and
    input; `side_reads` the nodes off the path that read the producer's other channels (the q
    and k parts), which the probe proved never see a scaled channel.
    """

    kind: GroupKind
    input: fx.Node
    targets: tuple[fx.Node, ...]
    carrier: ScaleCarrier | None = None
    producer: fx.Node | None = None
    channel_map: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    path: tuple[fx.Node, ...] = ()
    side_reads: tuple[fx.Node, ...] = ()

    @property
    def layer(self) -> str | None:
        return layer_of(node_loc(self.targets[0]))

    @property
    def name(self) -> str:
        src = self.carrier.node if self.carrier else self.producer
        head = node_loc(src) if src is not None else None
        targets = ",".join(_short(node_loc(t) or t.name) for t in self.targets)
        return f"{self.kind} {head or src.name if src is not None else '?'} -> {targets}"

    @property
    def channels(self) -> int:
        """Size of the targets' input channel dimension."""
        return int(tensor_val(self.targets[0].args[1]).shape[1])

    def source_channels(self) -> int:
        """Number of independent scale entries (producer rows read, or input channels)."""
        if self.producer is None:
            return self.channels
        if self.rows is not None:
            return int(self.rows.numel())
        return int(tensor_val(self.producer.args[1]).shape[0])

    def source_index(self) -> torch.Tensor | None:
        """Per input channel, its scale entry: the position of its producer row in `rows`."""
        if self.channel_map is None or self.rows is None:
            return self.channel_map
        return torch.searchsorted(self.rows, self.channel_map)

    def reduce(self, per_input: torch.Tensor, how: Literal["mean", "max"] = "mean") -> torch.Tensor:
        """Reduce a per-input-channel vector to one value per source channel."""
        index = self.source_index()
        if index is None:
            return per_input
        out = torch.zeros(self.source_channels(), dtype=per_input.dtype)
        reduce = "mean" if how == "mean" else "amax"
        return out.scatter_reduce(0, index, per_input, reduce, include_self=False)

    def expand(self, per_source: torch.Tensor) -> torch.Tensor:
        """Spread a per-source-channel vector over the targets' input channels."""
        index = self.source_index()
        return per_source if index is None else per_source[index]


def _short(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def op_name(node: fx.Node) -> str:
    """`aten.slice`, `getitem`: the operator a node calls, without its overload."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t.overloadpacket.__name__}"
    return getattr(t, "__name__", str(t))


def where(node: fx.Node) -> str:
    """A node as messages name it: a linear by its module path, a constant by its name, any
    other op as `aten.slice in model.layers.0.self_attn` (the graph name only without a path)."""
    if node.op == "get_attr":
        return str(node.target)
    loc = node_loc(node)
    if node.op == "call_function" and node.target is aten.linear.default and loc:
        return loc
    if node.op != "call_function":
        return node.name
    return f"{op_name(node)} in {loc}" if loc else f"{op_name(node)} ({node.name})"


def module_of(node: fx.Node) -> str:
    """The module path a node was traced from (its graph name only without one)."""
    return node_loc(node) or node.name


def where_all(nodes: Iterable[fx.Node]) -> str:
    """`where` of each node, repeats dropped, in the order given."""
    return ", ".join(dict.fromkeys(where(n) for n in nodes))


@dataclass
class Refusal:
    """A candidate subgraph where folding would not be exact, and why.

    `nodes` names the candidate by module paths: its norm or producer first, then its linears.
    """

    kind: str
    nodes: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        head, *targets = self.nodes
        if targets:
            head += " -> " + ",".join(_short(t) for t in targets)
        return f"{self.kind} at {head}: {self.reason}"


@dataclass
class LinearGroups:
    """Every foldable group of the program, and the candidates refused with their reasons."""

    name = "linear-groups"
    groups: list[LinearGroup] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    @classmethod
    def compute(cls, program: Program, am: AnalysisManager | None = None) -> LinearGroups:
        from slimc.analyses.channel_probe import probe_channel_maps
        from slimc.analyses.group_discovery import _norm_linear, _path_group

        result = cls()
        by_input: dict[fx.Node, list[fx.Node]] = {}
        for node in program.graph.find_nodes(op="call_function", target=aten.linear.default):
            w = node.args[1]
            if is_constant(w) and tensor_val(w).is_floating_point() and tensor_val(w).dim() == 2:
                x = node.args[0]
                assert isinstance(x, fx.Node)
                by_input.setdefault(x, []).append(node)
        paths: list[LinearGroup] = []
        for x, linears in by_input.items():
            group = _norm_linear(x, linears, result) or _path_group(x, linears, by_input, result)
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
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
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
