"""The vocabulary of linear groups: group kinds, the ops a scale passes through, a group,
a scale carrier, a refusal, and how messages name nodes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from slimc.ir.builder import tensor_val
from slimc.program import layer_of, node_loc

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
        return int(tensor_val(self.targets[0].args[1]).shape[-1])

    @property
    def reads_experts(self) -> bool:
        """Whether a target is a MoE expert stack (`slimc::expert_linear`, weight [E, N, K])."""
        return any(tensor_val(t.args[1]).dim() == 3 for t in self.targets)

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
