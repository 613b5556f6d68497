"""ResidualStream: the tensors a hidden-size rotation must cover, and who writes and reads them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from slimc.analyses.group_types import module_of
from slimc.analyses.stream_types import (
    CHANNEL_SUMS,
    SHAPE_ONLY,
    NormScale,
    OnlinePoint,
    StreamRefusal,
)
from slimc.analyses.stream_walker import StreamWalker
from slimc.ir.builder import is_constant
from slimc.program import Program

if TYPE_CHECKING:
    from slimc.analysis import AnalysisManager

__all__ = [  # the stream vocabulary (slimc.analyses.stream_types), where users import it from
    "CHANNEL_SUMS",
    "SHAPE_ONLY",
    "NormScale",
    "OnlinePoint",
    "ResidualStream",
    "StreamRefusal",
]

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class ResidualStream:
    """The residual stream of a decoder, found by following the token embedding's output.

    A rotation `x -> x Q` of every tensor in `nodes` is exact when: the `embeddings` tables are
    right-rotated (`E Q`), the `writers` (linears whose output is added into the stream: o_proj,
    down_proj) left-rotated (`Q^T W`, bias too), the `readers` (linears reading the stream
    through its norms: q/k/v, gate/up, lm_head) right-rotated (`W Q`) after each of the `norms`
    scales is fused into its readers, and each of the `online` values is rotated at run time.
    What lets the rotation through: channel sums of squares (RMSNorm statistics), per-token
    factors, residual adds, casts and moves that keep the channel dim. `mean_readers` are the
    nodes that subtract the channel mean (LayerNorm, `x - mean(x)`, and the means themselves):
    they let a rotation through only if it maps the all-ones direction to itself; nodes in
    `mean_dependent` read the stream's mean (an RMSNorm or a linear on the raw stream), which
    mean-baking would change. Anything else reading the stream is refused with the node named
    (a graph output of hidden states, a per-channel op that is not a norm scale).
    """

    name = "residual-stream"
    hidden: int = 0
    start: fx.Node | None = None
    nodes: set[fx.Node] = field(default_factory=set)
    embeddings: list[fx.Node] = field(default_factory=list)
    writers: list[fx.Node] = field(default_factory=list)
    readers: list[fx.Node] = field(default_factory=list)
    norms: list[NormScale] = field(default_factory=list)
    online: list[OnlinePoint] = field(default_factory=list)
    refused: list[StreamRefusal] = field(default_factory=list)
    mean_readers: list[fx.Node] = field(default_factory=list)
    mean_dependent: list[fx.Node] = field(default_factory=list)

    @property
    def centers(self) -> bool:
        """Whether a norm subtracts the stream's channel mean (LayerNorm): the rotation must then
        map the all-ones direction to itself."""
        return bool(self.mean_readers)

    @property
    def mean_free_readers(self) -> bool:
        """Whether every reader of the stream removes its channel mean first (each value read is
        the same for `x` and `x - mean(x)`), so mean-baking the writers is exact."""
        return self.centers and not self.mean_dependent

    @classmethod
    def compute(cls, program: Program, am: AnalysisManager | None = None) -> ResidualStream:
        result = cls()
        start = next(
            (
                n
                for n in program.graph.find_nodes(op="call_function", target=aten.embedding.default)
                if is_constant(n.args[0]) and n.args[0].meta["val"].dim() == 2  # type: ignore[union-attr]
            ),
            None,
        )
        if start is None:
            result.refused.append(StreamRefusal(None, "no embedding lookup starts a stream"))
            return result
        result.start = start
        result.hidden = int(start.meta["val"].shape[-1])
        StreamWalker(result).run(program.graph, start)
        for r in result.refused:
            log.info("residual-stream: %s", r)
        return result

    def describe(self) -> str:
        """One line per writer, reader, norm and refusal (what `--print-analyses` shows)."""
        lines = [
            f"residual-stream: hidden {self.hidden}, {len(self.writers)} writers, "
            f"{len(self.readers)} readers, {len(self.norms)} norms, {len(self.online)} online, "
            f"{len(self.refused)} refused"
        ]
        if self.centers:
            bake = "exact" if self.mean_free_readers else "not exact (the mean is read)"
            lines.append(
                f"  {len(self.mean_readers)} nodes subtract the channel mean; mean-baking {bake}"
            )
        lines += [f"  embedding {module_of(n)}" for n in self.embeddings]
        lines += [f"  writer {module_of(n)}" for n in self.writers]
        for norm in self.norms:
            readers = ",".join(module_of(r).rsplit(".", 1)[-1] for r in norm.readers)
            lines.append(f"  norm {module_of(norm.carrier.node)} -> {readers}")
        lines += [f"  online {module_of(p.value)}: {p.reason}" for p in self.online]
        lines += [f"  refused {r}" for r in self.refused]
        if self.centers:
            lines += [f"  reads the mean {module_of(n)} ({n.name})" for n in self.mean_dependent]
        return "\n".join(lines)
