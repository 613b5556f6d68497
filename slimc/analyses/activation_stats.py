"""ActivationStats: per-channel and per-token statistics of every float linear input, layer by layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx

from slimc import distributed
from slimc.analyses.linear_groups import where
from slimc.ir.builder import tensor_val
from slimc.linear_select import float_linears
from slimc.program import Program, node_loc
from slimc.runner import LayerwiseRunner, Segment

if TYPE_CHECKING:
    from slimc.analysis import AnalysisManager

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class ChannelStats:
    """Statistics of one activation over all calibration tokens, per channel (last dim).

    `absmax`, `absmean`, `min`, `max` are per channel; `token_absmax_mean` / `token_absmax_max`
    summarize the per-token absolute maximum (what a per-token quantizer sees).
    """

    absmax: torch.Tensor
    absmean: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    tokens: int
    token_absmax_mean: float | None
    token_absmax_max: float | None

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        inf = torch.full((channels,), float("inf"), dtype=torch.float64)
        return cls(
            torch.zeros(channels, dtype=torch.float64),
            torch.zeros(channels, dtype=torch.float64),
            inf.clone(),
            -inf,
            0,
            0.0,
            0.0,
        )

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        if flat.numel() == 0:
            return
        n = flat.shape[0]
        abs_ = flat.abs()
        self.absmax = torch.maximum(self.absmax, abs_.amax(0))
        total = self.tokens + n
        self.absmean = self.absmean * (self.tokens / total) + abs_.sum(0) / total
        self.min = torch.minimum(self.min, flat.amin(0))
        self.max = torch.maximum(self.max, flat.amax(0))
        per_token = abs_.amax(1)
        assert self.token_absmax_mean is not None and self.token_absmax_max is not None
        self.token_absmax_mean = (
            self.token_absmax_mean * (self.tokens / total) + float(per_token.sum()) / total
        )
        self.token_absmax_max = max(self.token_absmax_max, float(per_token.max()))
        self.tokens = total

    def all_reduce(self) -> None:
        """Make these the statistics of every calibration rank's tokens (`slimc.distributed`):
        extremes reduced, means weighted by each rank's tokens. A no-op in one process."""
        if not distributed.active():
            return
        assert self.token_absmax_mean is not None and self.token_absmax_max is not None
        tokens = distributed.reduce_count(self.tokens, "activation token counts")
        means = (
            torch.cat([self.absmean, torch.tensor([self.token_absmax_mean], dtype=torch.float64)])
            * self.tokens
        )
        means = distributed.reduce_sum(means, "activation means") / max(tokens, 1)
        highs = torch.cat(
            [self.absmax, self.max, torch.tensor([self.token_absmax_max], dtype=torch.float64)]
        )
        highs = distributed.reduce_max(highs, "activation maxima")
        channels = self.absmax.numel()
        self.absmean, self.token_absmax_mean = means[:channels], float(means[channels])
        self.absmax, self.max = highs[:channels], highs[channels : 2 * channels]
        self.token_absmax_max = float(highs[-1])
        self.min = distributed.reduce_min(self.min, "activation minima")
        self.tokens = tokens

    def subtract(self, shift: torch.Tensor) -> None:
        """The statistics of `x - shift` (per channel). The mean |x| becomes unknown (NaN)."""
        shift = shift.double()
        self.min = self.min - shift
        self.max = self.max - shift
        self.absmax = torch.maximum(self.min.abs(), self.max.abs())
        self.absmean = torch.full_like(self.absmean, float("nan"))
        self.token_absmax_mean = None
        self.token_absmax_max = None

    def divide(self, s: torch.Tensor) -> None:
        """The statistics of `x / s` (s > 0 per channel), without recomputing.

        Per-token summaries cannot be derived from per-channel ones, so they become unknown.
        """
        s = s.double()
        self.absmax = self.absmax / s
        self.absmean = self.absmean / s
        self.min = self.min / s
        self.max = self.max / s
        self.token_absmax_mean = None
        self.token_absmax_max = None


@dataclass
class ActivationStats:
    """Statistics of every float linear's input, keyed by the input node.

    Computed on the calibration set by the layer-wise runner. Passes that divide an activation by
    a per-channel scale update the entry with `divide` and keep the analysis valid.
    """

    name = "activation-stats"
    needs_calibration: ClassVar[bool] = True
    stats: dict[fx.Node, ChannelStats] = field(default_factory=dict)

    def __getitem__(self, node: fx.Node) -> ChannelStats:
        return self.stats[node]

    def __contains__(self, node: object) -> bool:
        return node in self.stats

    @classmethod
    def compute(cls, program: Program, am: AnalysisManager | None = None) -> ActivationStats:
        samples = program.require_calibration("activation-stats")
        first: dict[fx.Node, fx.Node] = {}  # input -> the first linear reading it
        for lin in float_linears(program):
            first.setdefault(lin.args[0], lin)  # type: ignore[arg-type]
        inputs = {lin: x for x, lin in first.items()}
        result = cls()
        wanted = set(inputs)

        def hook(node: fx.Node, args: tuple[Any, ...]) -> None:
            x = inputs[node]
            if x not in result.stats:
                result.stats[x] = ChannelStats.empty(args[0].shape[-1])
            result.stats[x].update(args[0])

        def visit(seg: Segment, runner: LayerwiseRunner) -> None:
            here = [n for n in seg.nodes if n in wanted]
            if here:
                runner.forward(seg.nodes, {n: hook for n in here}, advance=True)  # observes only

        runner = LayerwiseRunner(program, samples)
        runner.run(visit)
        for x in inputs.values() if distributed.active() else ():
            # graph order: every rank runs the same collectives in the same order
            if x not in result.stats:  # a rank never saw it (it ran no sample through it)
                result.stats[x] = ChannelStats.empty(tensor_val(x).shape[-1])  # type: ignore[arg-type]
            result.stats[x].all_reduce()
        log.info("activation-stats: %d linear inputs observed", len(result.stats))
        return result

    def describe(self) -> str:
        lines = [f"activation-stats: {len(self.stats)} linear inputs"]
        for x, st in self.stats.items():
            med = float(st.absmax.median())
            ratio = float(st.absmax.max()) / med if med > 0 else float("inf")
            users = ",".join(sorted({node_loc(u) or u.name for u in x.users}))
            lines.append(
                f"  {where(x)} -> {users}: absmax {float(st.absmax.max()):.4g} "
                f"(max/median {ratio:.1f}), tokens {st.tokens}"
            )
        return "\n".join(lines)
