"""A quantized linear's results as tensors for a run's work directory, and back (for resume)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import fx

from slimc.errors import UserError
from slimc.program import Program
from slimc.quant.qparams import QuantizedWeight
from slimc.runner import split_segments
from slimc.work_dir import LayerJournal

log = logging.getLogger(__name__)


def linear_key(node: fx.Node) -> str:
    """A float linear's name in the record: its weight constant (stable from run to run).
    Taken before the rewrite, which replaces the weight argument."""
    return str(node.args[1].target) if isinstance(node.args[1], fx.Node) else node.name


def recorded_results(
    key: str,
    static_qparams: tuple[torch.Tensor, torch.Tensor] | None,
    qw: QuantizedWeight,
) -> dict[str, torch.Tensor]:
    """The tensors that reproduce the rewrite of linear `key`: rounded weight, scales, input
    range."""
    out = {f"{key}:qdata": qw.qdata, f"{key}:scale": qw.scale}
    if qw.zero_point is not None:
        out[f"{key}:zero_point"] = qw.zero_point
    if static_qparams is not None:
        out[f"{key}:input_scale"], out[f"{key}:input_zero_point"] = static_qparams
    return out


def recorded_tensor(recorded: Mapping[str, torch.Tensor], owner: str, field: str) -> torch.Tensor:
    """`owner`'s `field` in a finished layer's record (written under `"{owner}:{field}"`).

    Raises:
        UserError: the record lacks it (the work directory is of another run).
    """
    key = f"{owner}:{field}"
    if key not in recorded:
        raise UserError(
            f"--resume: the work directory has no record of {owner} ({key}): it is of another "
            "run; remove it"
        )
    return recorded[key]


def replayed_results(
    recorded: dict[str, torch.Tensor], node: fx.Node, static: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, dict[str, torch.Tensor | None]]:
    """The static input range and weight parts `recorded_results` wrote for `node`.

    Raises:
        UserError: the record lacks them (the work directory is of another run).
    """
    key = linear_key(node)
    parts: dict[str, torch.Tensor | None] = {
        "qdata": recorded_tensor(recorded, key, "qdata"),
        "scale": recorded_tensor(recorded, key, "scale"),
        "zero_point": recorded.get(f"{key}:zero_point"),
    }
    qparams = None
    if static:
        qparams = (
            recorded_tensor(recorded, key, "input_scale"),
            recorded_tensor(recorded, key, "input_zero_point"),
        )
    return qparams, parts


def open_journal(program: Program, pass_name: str, wanted: set[fx.Node]) -> LayerJournal | None:
    """The pass's journal in the run's work directory (None without one); logs where a resumed
    run starts."""
    work_dir = program.context.work_dir
    if work_dir is None:
        return None
    journal = work_dir.journal(pass_name)
    labels = [s.label for s in split_segments(program.graph) if wanted & set(s.nodes)]
    done = journal.count_finished(labels)
    if done == len(labels):
        log.warning("%s: all %d layers are recorded: replaying them", pass_name, done)
    elif done:
        log.warning("%s: resuming at layer %d of %d", pass_name, done + 1, len(labels))
    return journal
