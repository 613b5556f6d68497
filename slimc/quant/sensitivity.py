"""Layer sensitivity: how much each decoder layer's output moves when its linears are quantized.

msModelSlim's `mse_layer_wise` metric: for every decoder layer, the chosen linears are quantized
with a probe scheme (round to nearest, MinMax ranges; activations quantized as the scheme does
at run time) and the layer's outputs are compared with its float outputs on the same recorded
inputs (the float model's values). The score is the mean squared error averaged over samples
and floating outputs; a larger score means a more sensitive layer. Absolute error is the right
measure here: an error a layer adds to the residual stream is carried to the final norm
unchanged, whatever the stream's magnitude at that depth.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from slimc.errors import UserError
from slimc.program import Program, node_loc
from slimc.quant.layer_run import act_fake_quant, output_loss, run_region, upstream
from slimc.quant.qparams import quantize_weight
from slimc.quant.scheme import LinearQuantScheme
from slimc.runner import LayerwiseRunner, Segment
from slimc.smooth.region import Recorder, Region, RegionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerScore:
    """One decoder layer's sensitivity: its key, its probed linears and the output MSE."""

    layer: str
    linears: tuple[str, ...]
    score: float


def rank_layers(
    program: Program,
    probe: LinearQuantScheme,
    linears: Collection[fx.Node],
    samples: Sequence[tuple[Any, ...]],
    progress: bool | None = None,
) -> list[LayerScore]:
    """Decoder layers holding any of `linears` (float `aten.linear` nodes), most sensitive first.

    Only decoder layers are scored (the prologue and epilogue segments are not); the program
    is not changed.

    Raises:
        UserError: a layer cannot be run on its own from recorded inputs, or probing a
            linear's weight fails (e.g. its K does not fit the probe's group size).
    """
    wanted = set(linears)
    scores: list[LayerScore] = []

    def visit(seg: Segment, runner: LayerwiseRunner) -> None:
        here = [n for n in seg.nodes if n in wanted]
        if seg.key is None or not here:
            return
        scores.append(_score_layer(program, seg, here, probe, runner))

    LayerwiseRunner(program, samples, progress=progress).run(visit)
    scores.sort(key=lambda s: s.score, reverse=True)
    return scores


def _score_layer(
    program: Program,
    seg: Segment,
    here: list[fx.Node],
    probe: LinearQuantScheme,
    runner: LayerwiseRunner,
) -> LayerScore:
    region = Region.of(seg.nodes, seg.label)
    try:
        recorder = Recorder(region)
    except RegionError as exc:
        raise UserError(f"sensitivity: cannot run {seg.label} on its own: {exc}") from None
    hooks = recorder.hooks()
    runner.forward(upstream(seg.nodes, hooks), hooks)
    consts = {c: program.weights.get(str(c.target)) for c in region.constants}
    probed = dict(consts)
    act_quant = {}
    for node in here:
        w_node = node.args[1]
        assert isinstance(w_node, fx.Node)
        weight = consts[w_node]
        try:
            probed[w_node] = probe_weight(weight, probe)
        except ValueError as exc:
            raise UserError(f"sensitivity: probing {node_loc(node)}: {exc}") from None
        if probe.activation is not None:
            act_quant[node] = act_fake_quant(probe.activation, None, str(weight.device))
    total = 0.0
    with torch.no_grad():
        for inputs in recorder.samples:
            ref = run_region(region, {**inputs, **consts}, {})
            out = run_region(region, {**inputs, **probed}, act_quant)
            total += float(output_loss(out, ref))
    count = max(len(recorder.samples), 1)
    recorder.samples.clear()
    names = tuple(node_loc(n) or n.name for n in here)
    return LayerScore(seg.label, names, total / count)


def most_sensitive(scores: Sequence[LayerScore], fraction: float) -> list[LayerScore]:
    """The top `fraction` of the ranked layers, rounded up (at least one when fraction > 0)."""
    if fraction <= 0 or not scores:
        return []
    share = fraction * len(scores)
    count = min(len(scores), max(1, math.ceil(share - 1e-9)))  # 0.07 * 100 is 7.000000000000001
    return list(scores[:count])


def describe(scores: Sequence[LayerScore]) -> str:
    """A one-line summary of ranked layers for the log: `layer (score), ...`."""
    return ", ".join(f"{s.layer} ({s.score:.3g})" for s in scores)


def probe_weight(weight: Tensor, probe: LinearQuantScheme) -> Tensor:
    """The probe's round-to-nearest version of a float weight (what a layer is scored with)."""
    return quantize_weight(weight.float(), probe.weight).dequantize().to(weight.dtype)
