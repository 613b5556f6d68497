"""The layer-wise driver of the searching smoothing passes, with resume from a work directory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from slimc.analyses.linear_groups import LinearGroup
from slimc.program import Program
from slimc.quant.replay import open_journal, recorded_tensor
from slimc.runner import LayerwiseRunner, Segment
from slimc.smooth.fold import fold_scale
from slimc.smooth.search import GroupInput, TokenSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Folded:
    """What a handler folded into one group: the scale, and the numbers that chose it (alpha,
    beta, errors), both kept in the work directory so a resumed run folds the same scale."""

    scale: Tensor
    choice: tuple[float, ...]


Handler = Callable[[LinearGroup, GroupInput], Folded]
Replayed = Callable[[LinearGroup, tuple[float, ...]], None]


def smooth_layerwise(
    program: Program,
    groups: Sequence[LinearGroup],
    handle: Handler,
    *,
    pass_name: str,
    max_tokens: int,
    seed: int = 0,
    replayed: Replayed | None = None,
) -> None:
    """Layer by layer: collect each group's input (hook on its first target), call `handle` on
    the groups of the layer in the given order (it folds a scale and returns it), then advance
    the samples through the changed layer, so later layers see the smoothed model's activations.

    With a work directory, each finished layer's scales are recorded; a resumed run folds the
    recorded scales of the layers a killed run finished (calling `replayed` with each group's
    recorded choice, for the pass's statistics) instead of searching them again, and the
    result is bitwise that of an uninterrupted run.
    """
    samples = program.require_calibration(pass_name)
    sampler = TokenSampler(max_tokens, len(samples), seed)
    journal = open_journal(program, pass_name, {g.targets[0] for g in groups})

    def visit(seg: Segment, runner: LayerwiseRunner) -> None:
        pos = {n: i for i, n in enumerate(seg.nodes)}
        here = [g for g in groups if g.targets[0] in pos]
        if not here:
            return
        recorded = journal.finished(seg.label) if journal is not None else None
        if recorded is not None:  # finished by a run that was stopped: its scales, refolded
            runner.forward(seg.nodes, advance=True)  # the outputs the first run advanced with
            for g in here:
                scale, choice = _recorded(recorded, g)
                fold_scale(program, g, scale, stats=None)
                if replayed is not None:
                    replayed(g, choice)
            return
        inputs = {g.targets[0]: GroupInput.empty(g.channels) for g in here}
        calls = dict.fromkeys(inputs, 0)

        def hook(node: fx.Node, args: tuple[Any, ...]) -> None:
            x = args[0]
            i = calls[node]
            calls[node] = i + 1
            inputs[node].update(x, sampler.indices(i, x.numel() // x.shape[-1]))

        # the whole layer: the folds below are exact, so its outputs stand for the smoothed
        # layer's and the runner does not run the layer a second time to advance the samples
        runner.forward(seg.nodes, dict.fromkeys(inputs, hook), advance=True)
        record: dict[str, Tensor] = {}
        for g in here:
            collected = inputs.pop(g.targets[0])
            log.debug(
                "%s: %s: %d tokens, %d kept",
                pass_name,
                g.name,
                collected.tokens,
                collected.sample.shape[0],
            )
            with torch.no_grad():
                folded = handle(g, collected)
            record[f"{g.name}:scale"] = folded.scale.detach()
            record[f"{g.name}:choice"] = torch.tensor(folded.choice, dtype=torch.float64)
        if journal is not None:
            journal.record(seg.label, record)

    LayerwiseRunner(program, samples).run(visit)


def _recorded(recorded: dict[str, Tensor], group: LinearGroup) -> tuple[Tensor, tuple[float, ...]]:
    """The scale and choice recorded for `group`.

    Raises:
        UserError: the record lacks them (the work directory is of another run).
    """
    scale = recorded_tensor(recorded, group.name, "scale")
    choice = recorded_tensor(recorded, group.name, "choice")
    return scale, tuple(float(v) for v in choice.tolist())
