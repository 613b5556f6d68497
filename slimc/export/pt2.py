"""Save / load a compiled slimc program as a torch.export `.pt2` archive (plus config/tokenizer)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

import slimc.ops  # noqa: F401 - registers the slimc:: custom ops
from slimc import __version__
from slimc.errors import UserError, first_line
from slimc.registry import load_kernel_families

__all__ = ["PT2_NAME", "load_pt2", "program_of", "save_pt2"]

log = logging.getLogger(__name__)

PT2_NAME = "model.pt2"
"""File name of the exported program inside a pt2 output directory."""

EXTRA_STAGE = "slimc_stage"
EXTRA_VERSION = "slimc_version"
EXTRA_INPUTS = "slimc_inputs"


def program_of(model: Any) -> Any:
    """The `slimc.program.Program` behind `model` (a Program or a `slimc.compile` result).

    Raises:
        UserError: `model` carries no slimc program.
    """
    from slimc.program import Program

    if isinstance(model, Program):
        return model
    program = getattr(model, "slimc_program", None)
    if not isinstance(program, Program):
        raise UserError(
            f"{type(model).__name__} has no slimc program: the pt2 format saves the result of "
            "slimc.compile (or a slimc.Program)"
        )
    return program


def _dynamic_shapes(program: Any) -> tuple[Any, ...]:
    """Dynamic batch + sequence dims for a causal LM's token ids; dynamic batch otherwise."""
    if program.metadata.get("hf_causal_lm"):
        return tuple(
            {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} if isinstance(x, torch.Tensor) else None
            for x in program.example_inputs
        )
    return tuple(
        {0: Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        for x in program.example_inputs
    )


def export_program(program: Any) -> torch.export.ExportedProgram:
    """Re-export the program's graph module with torch.export (non-strict, dynamic dims).

    Raises:
        UserError: torch.export rejects the graph (the message gives its reason).
    """
    gm = program.graph_module
    try:
        with torch.no_grad(), program.materialized():
            return torch.export.export(
                gm,
                tuple(program.example_inputs),
                dynamic_shapes=_dynamic_shapes(program),
                strict=False,
            )
    except Exception as exc:
        reason = first_line(exc)
        raise UserError(f"cannot export the compiled program with torch.export: {reason}") from exc


def save_pt2(model: Any, out: Path, tokenizer: Any = None) -> Path:
    """Write `DIR/model.pt2` (plus config / generation config / tokenizer files) into `out`.

    The archive's `extra_files` hold the program stage (`slimc_stage`), the slimc version
    (`slimc_version`) and a JSON description of the inputs (`slimc_inputs`).

    Returns:
        The path of the `.pt2` file.

    Raises:
        UserError: `model` has no slimc program, or the graph cannot be exported.
    """
    program = program_of(model)
    ep = export_program(program)
    inputs = [
        {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
        if isinstance(x, torch.Tensor)
        else {"type": type(x).__name__}
        for x in program.example_inputs
    ]
    extra = {
        EXTRA_STAGE: program.stage.label,
        EXTRA_VERSION: __version__,
        EXTRA_INPUTS: json.dumps(
            {"example_inputs": inputs, "model_class": program.metadata.get("model_class")}
        ),
    }
    path = out / PT2_NAME
    torch.export.save(ep, path, extra_files=extra)
    if isinstance(model, nn.Module):
        _save_hf_files(model, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    log.info("pt2: saved %s (stage %s)", path, program.stage.label)
    return path


def _save_hf_files(model: nn.Module, out: Path) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return
    config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)


def _register_ops() -> None:
    """Load the kernel families, which define their `slimc::` custom ops (kernels are optional)."""
    load_kernel_families()


def load_pt2(path: Path) -> nn.Module:
    """Load a `.pt2` file (or a directory holding `model.pt2`) and return `ep.module()`.

    The returned module has attributes `slimc_stage` and `slimc_version` from the archive.

    Raises:
        UserError: the file is missing or is not a loadable torch.export archive.
    """
    _register_ops()
    file = path / PT2_NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file} does not exist")
    extra = {EXTRA_STAGE: "", EXTRA_VERSION: "", EXTRA_INPUTS: ""}
    try:
        ep = torch.export.load(file, extra_files=extra)
    except Exception as exc:
        reason = first_line(exc)
        raise UserError(f"cannot load {file} as a torch.export program: {reason}") from exc
    module = ep.module()
    module.slimc_stage = extra[EXTRA_STAGE] or None
    module.slimc_version = extra[EXTRA_VERSION] or None
    return module
