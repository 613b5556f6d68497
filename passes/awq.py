"""awq: Activation-aware Weight Quantization's scale search, folded as an exact smoothing."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from slimc.analyses.linear_groups import LinearGroup, LinearGroups
from slimc.analysis import AnalysisManager
from slimc.calibration import evenly_spaced
from slimc.pass_base import GROUP_SIZE, OptionError, PassResult, Preserved, option
from slimc.pipeline_spec import OptionValue
from slimc.program import Program
from slimc.quant.qparams import quantize_weight
from slimc.quant.replay import open_journal, recorded_tensor
from slimc.quant.scheme import QuantTarget, TensorQuantSpec, make_scheme
from slimc.runner import LayerwiseRunner, Segment
from slimc.smooth.base import SmoothingPass
from slimc.smooth.fold import fold_scale
from slimc.smooth.region import Recorder, Region, RegionError, lca_region, merge_hooks

log = logging.getLogger(__name__)

SCALE_MIN = 1e-4
"""Lower bound of `mean|x|^r` before normalization (AWQ's)."""


@dataclass
class ScaleSearch:
    """The outcome of one group's grid search.

    Attributes:
        ratios: the ratios tried, `i / n` for `i < n`.
        losses: the measured loss of each ratio (mean squared error of the region's outputs).
        best: index of the chosen ratio (the first minimum, so ties keep the smaller ratio).
        scale: the chosen scale, one entry per source channel (what `fold_scale` takes).
    """

    ratios: list[float]
    losses: list[float]
    best: int
    scale: torch.Tensor

    @property
    def ratio(self) -> float:
        return self.ratios[self.best]

    @property
    def loss(self) -> float:
        return self.losses[self.best]

    @property
    def base_loss(self) -> float:
        """The loss without smoothing (ratio 0)."""
        return self.losses[0]


def candidate_scale(group: LinearGroup, act_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """AWQ's scale for one ratio, one entry per source channel (float64).

    `s = max(mean|x|^ratio, 1e-4)`, normalized by `sqrt(max(s) * min(s))`; for grouped-query
    `ov` groups the per-input-channel scale is then averaged over the channels sharing one
    producer channel (`group.reduce(s, "mean")`), which is what gets folded.
    """
    s = act_mean.double().clamp(min=0).pow(ratio).clamp(min=SCALE_MIN)
    s = s / torch.sqrt(s.max() * s.min())
    return group.reduce(s, "mean")


def fake_quant_weights(
    program: Program, group: LinearGroup, scale: torch.Tensor, spec: TensorQuantSpec
) -> dict[str, torch.Tensor]:
    """The targets' weights as `Q(W * s) / s`: quantized with the smoothing, input left unscaled.

    `W * s` is rounded to the weight's dtype exactly as `fold_scale` stores it, so the search
    measures the weights the fold produces.
    """
    s_in = group.expand(scale.double())
    out: dict[str, torch.Tensor] = {}
    for t in group.targets:
        target = str(t.args[1].target)  # type: ignore[union-attr]
        w = program.weights.get(target)
        scaled = (w.double() * s_in).to(w.dtype)
        rows = scaled.reshape(-1, w.shape[-1])  # an expert stack [E, N, K]: its E * N rows
        dq = quantize_weight(rows, spec).dequantize(w.dtype).reshape(w.shape)
        out[target] = dq / s_in.to(w.dtype)
    return out


def region_loss(
    program: Program,
    region: Region,
    inputs: Sequence[dict[fx.Node, Any]],
    refs: Sequence[list[Any]],
    overrides: dict[str, torch.Tensor] | None,
) -> float:
    """Mean squared error of the region's floating outputs against `refs`, over all samples."""
    total = 0.0
    count = 0
    for x, ref in zip(inputs, refs, strict=True):
        for out, r in zip(region.run(program, x, overrides), ref, strict=True):
            if isinstance(r, torch.Tensor) and r.is_floating_point():
                total += float(torch.nn.functional.mse_loss(out, r, reduction="sum"))
                count += r.numel()
    return total / max(count, 1)


def search_scale(
    program: Program,
    group: LinearGroup,
    region: Region,
    inputs: Sequence[dict[fx.Node, Any]],
    act_mean: torch.Tensor,
    spec: TensorQuantSpec,
    n_grid: int = 20,
) -> ScaleSearch:
    """Grid-search AWQ's ratio for one group on recorded region inputs (weights left as found).

    For each ratio the targets' weights are replaced by `Q(W * s) / s` (`spec` quantizes),
    the region is run on every recorded sample, and the loss is the mean squared error of its
    outputs against the float region's.
    """
    with torch.inference_mode():
        refs = [region.run(program, x) for x in inputs]
        ratios = [i / n_grid for i in range(n_grid)]
        losses: list[float] = []
        scales: list[torch.Tensor] = []
        for r in ratios:
            scale = candidate_scale(group, act_mean, r)
            overrides = fake_quant_weights(program, group, scale, spec)
            losses.append(region_loss(program, region, inputs, refs, overrides))
            scales.append(scale)
    ranked = [loss if math.isfinite(loss) else math.inf for loss in losses]
    best = min(range(len(ranked)), key=lambda i: (ranked[i], i))
    return ScaleSearch(ratios, losses, best, scales[best].clone())  # a normal tensor again


class AbsMean:
    """Per-channel mean |x| over every token seen by `hook` (the group input's statistic)."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    def hook(self, node: fx.Node, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1])
        part = flat.abs().sum(0, dtype=torch.float64)
        self.sum = part if self.sum is None else self.sum + part
        self.tokens += flat.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        assert self.sum is not None
        return self.sum / max(self.tokens, 1)


def folded_values(group: LinearGroup) -> set[fx.Node]:
    """Nodes whose values change when a scale is folded into the group (its input and path; not
    the other parts of a fused producer, whose rows the fold leaves alone)."""
    if group.carrier is not None:
        starts = [group.carrier.weight, group.carrier.bias]
    else:
        assert group.producer is not None
        p = group.producer
        bias = p.args[2] if len(p.args) > 2 else p.kwargs.get("bias")
        starts = [p.args[1], bias]
    stop = set(group.targets) | set(group.side_reads)  # side reads see only unscaled rows
    seen: set[fx.Node] = set()
    stack = [u for c in starts if isinstance(c, fx.Node) for u in c.users]
    while stack:
        n = stack.pop()
        if n in stop or n in seen or n.op == "output":
            continue
        seen.add(n)
        stack.extend(n.users)
    return seen


@dataclass(frozen=True, kw_only=True)
class AWQ(SmoothingPass):
    """AWQ: smooth each group with `s = mean|x|^r`, r searched against the weight quantizer's error.

    For every group (layer by layer, in folding order) the per-channel mean |x| of its input is
    measured on the search samples; each ratio r in {0, 1/n, ..., (n-1)/n} gives
    `s = max(mean|x|^r, 1e-4) / sqrt(max(s) min(s))`, the group's linears get weights
    `Q(W * s) / s` (Q: the weight quantizer given by bits / group-size / symmetric, which should
    match the linear-quant pass that follows), and the smallest module holding all of them (the
    attention block for q/k/v, the MLP for gate/up, the linear itself for o_proj / down_proj,
    found from the graph's module paths) is run on its recorded inputs; the loss is the mean
    squared error against its float outputs. The best s is folded (input divided by s, weights
    multiplied) before the next group of the layer is searched, and the samples then advance
    through the smoothed layer. Grouped-query o_proj scales are averaged per v_proj channel,
    and candidates are measured with the averaged scale. The float model computes the same
    function (quantization is a later pass). Exact.
    """

    name = "awq"
    cli_role = "anti-outlier"

    n_grid: int = option(20, "Number of ratios searched: r in {0, 1/n, ..., (n-1)/n}.")
    bits: int = option(4, "Weight bits of the quantizer the search simulates (4 or 8).")
    group_size: int = option(
        -1, "Weight group size along K in the search; -1 = per channel.", check=GROUP_SIZE
    )
    symmetric: bool = option(False, "Symmetric weight quantization in the search.")
    search_samples: int = option(
        16,
        "Calibration samples the search runs on, evenly spaced over the set (0 = all); each "
        "group's region runs n-grid + 1 times per sample, so the cost grows linearly with it.",
    )

    @classmethod
    def for_scheme(cls, target: QuantTarget) -> dict[str, OptionValue]:
        """Search against the weight quantizer the scheme will use (bits, symmetry, groups)."""
        opts: dict[str, OptionValue] = {
            "bits": (str(target.scheme.weight.bits),),
            "symmetric": (str(target.weight_symmetric).lower(),),
        }
        if target.group_size is not None:
            opts["group-size"] = (str(target.group_size),)
        return opts

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 1:
            raise OptionError(f"pass 'awq': n-grid must be >= 1, got {self.n_grid}")
        if self.bits not in (4, 8):
            raise OptionError(f"pass 'awq': bits must be 4 or 8, got {self.bits}")
        try:
            self.weight_spec()
        except ValueError as exc:
            raise OptionError(f"pass 'awq': {exc}") from None

    def weight_spec(self, k: int | None = None) -> TensorQuantSpec:
        """The weight quantizer the search simulates (per channel where group-size misfits K)."""
        scheme = "w4a16" if self.bits == 4 else "w8a16"
        spec = make_scheme(scheme, group_size=self.group_size, symmetric=self.symmetric).weight
        if k is not None and spec.granularity == "group" and k % spec.group_size:
            return dataclasses.replace(spec, granularity="channel", group_size=-1)
        return spec

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        preserved = Preserved.of(LinearGroups)
        groups = self.select(program, am)
        if not groups:
            return PassResult(changed=False, preserved=preserved)
        samples = evenly_spaced(program.require_calibration(self.name), self.search_samples)
        pending = list(groups)
        results: list[ScaleSearch] = []
        journal = open_journal(program, self.name, {g.targets[0] for g in groups})
        notes: set[str] = set()

        def note_once(key: str, msg: str, *args: Any) -> None:
            if key not in notes:
                notes.add(key)
                log.info(msg, *args)

        def visit(seg: Segment, runner: LayerwiseRunner) -> None:
            inside = set(seg.nodes)
            here = [g for g in pending if g.targets[0] in inside]
            if not here:
                return
            pending[:] = [g for g in pending if g.targets[0] not in inside]
            plan: list[tuple[LinearGroup, Region]] = []
            for g in here:
                if not folded_values(g) <= inside:
                    log.warning(
                        "awq: %s: its input is computed in an earlier block; not smoothed", g.name
                    )
                    self.stat(program, "skipped groups (input from an earlier block)")
                    continue
                try:
                    region = lca_region(g.targets, seg.nodes)
                    Recorder(region)  # every input must be recordable
                except RegionError as exc:
                    note_once(
                        "fallback",
                        "awq: %s: no common module region (%s); measuring the linears' own "
                        "outputs (logged once)",
                        g.name,
                        exc,
                    )
                    self.stat(program, "region fallbacks (linears' own outputs)")
                    region = Region.of(list(g.targets))
                plan.append((g, region))
            if not plan:
                return
            finished = journal.finished(seg.label) if journal is not None else None
            if finished is not None:  # searched by a run that was stopped: its scales refolded
                for g, _ in plan:
                    result = _replayed(finished, g)
                    results.append(result)
                    self._report(program, g, result)
                    if result.best > 0:
                        fold_scale(program, g, result.scale)
                return
            record: dict[str, torch.Tensor] = {}
            recorded = self._record(runner, seg, plan)
            changed: set[fx.Node] = set()
            for i, (g, region) in enumerate(plan):
                if changed & ({g.input} | set(region.inputs)):
                    # an earlier fold changed what this group reads: record the rest again
                    recorded[i:] = self._record(runner, seg, plan[i:])
                    changed = set()
                rec, mean = recorded[i]
                recorded[i] = None
                spec = self.weight_spec(g.channels)
                if spec.granularity != self.weight_spec().granularity:
                    note_once(
                        f"k{g.channels}",
                        "awq: group size %d does not divide K=%d; searching per channel there",
                        self.group_size,
                        g.channels,
                    )
                result = search_scale(program, g, region, rec.samples, mean.mean, spec, self.n_grid)
                results.append(result)
                self._report(program, g, result)
                record.update(_recorded(g, result))
                if result.best > 0:
                    fold_scale(program, g, result.scale)
                    changed |= folded_values(g)
            if journal is not None:
                journal.record(seg.label, record)

        LayerwiseRunner(program, samples).run(visit)
        if results:
            n = len(results)
            self.stat(program, "mean chosen ratio", sum(r.ratio for r in results) / n)
            self.stat(program, "mean loss reduction vs ratio 0 (%)", sum(map(_gain, results)) / n)
        folded = any(r.best > 0 for r in results)
        return PassResult(changed=folded, preserved=preserved)

    def _record(
        self, runner: LayerwiseRunner, seg: Segment, plan: Sequence[tuple[LinearGroup, Region]]
    ) -> list[Any]:
        """Run the segment once: per group, its region's inputs and its input's mean |x|."""
        out = [(Recorder(region), AbsMean()) for _, region in plan]
        hooks = merge_hooks(
            *(rec.hooks() for rec, _ in out),
            *({g.targets[0]: mean.hook} for (g, _), (_, mean) in zip(plan, out, strict=True)),
        )
        runner.forward(seg.nodes, hooks)
        return out

    def _report(self, program: Program, group: LinearGroup, result: ScaleSearch) -> None:
        log.info(
            "awq: %s: ratio %.2f, loss %.4g (%.4g at ratio 0, %.1f%% lower)",
            group.name,
            result.ratio,
            result.loss,
            result.base_loss,
            _gain(result),
        )
        if result.best == 0:
            self.stat(program, "groups left unscaled (ratio 0 best)")
        else:
            self.stat(program, "groups scaled")


def _gain(result: ScaleSearch) -> float:
    """How much lower the chosen ratio's loss is than ratio 0's, in percent."""
    base = result.base_loss
    gain = 100.0 * (base - result.loss) / base if base > 0 else 0.0
    return gain if math.isfinite(gain) else 0.0


def _recorded(group: LinearGroup, result: ScaleSearch) -> dict[str, torch.Tensor]:
    """The search's outcome as tensors for the work directory (for a resumed run)."""
    return {
        f"{group.name}:ratios": torch.tensor(result.ratios, dtype=torch.float64),
        f"{group.name}:losses": torch.tensor(result.losses, dtype=torch.float64),
        f"{group.name}:best": torch.tensor(result.best),
        f"{group.name}:scale": result.scale.detach(),
    }


def _replayed(finished: dict[str, torch.Tensor], group: LinearGroup) -> ScaleSearch:
    """The search outcome `_recorded` wrote for `group`.

    Raises:
        UserError: the record lacks it (the work directory is of another run).
    """

    def field(name: str) -> torch.Tensor:
        return recorded_tensor(finished, group.name, name)

    return ScaleSearch(
        ratios=field("ratios").tolist(),
        losses=field("losses").tolist(),
        best=int(field("best")),
        scale=field("scale"),
    )
