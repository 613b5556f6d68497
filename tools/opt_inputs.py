"""slimc-opt's inputs: an HF model directory, a case file with a builder, or a .pt2 program."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import sys
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from slimc.errors import UserError, first_line

if typing.TYPE_CHECKING:
    from torch import nn

    from slimc.program import Program

log = logging.getLogger("slimc.tools.opt")


# -- inputs -----------------------------------------------------------------------------------
def capture_model(model: nn.Module, example_inputs: Any, canonicalize: bool = True) -> Program:
    """Capture a model as a Program (a module-level seam: tests memoize it)."""
    from slimc.capture import capture

    return capture(model, example_inputs, canonicalize=canonicalize)


def _split_input(text: str) -> tuple[str, Path, str]:
    path, sep, builder = text.partition(":")
    if sep and path.endswith(".py"):
        return "case", Path(path), builder or "build"
    p = Path(text)
    if text.endswith(".py"):
        return "case", p, "build"
    if text.endswith(".pt2"):
        return "pt2", p, ""
    if p.is_dir():
        return "hf", p, ""
    if not p.exists():
        raise UserError(f"input {text} does not exist")
    raise UserError(
        f"cannot tell what {text} is: expected an HF model directory, "
        "case.py[:builder] or a .pt2 file"
    )


@contextlib.contextmanager
def _extra_sys_path(paths: Sequence[str]) -> Iterator[None]:
    """`paths` appended to sys.path for the block: last, so a checkout root among them cannot
    shadow installed packages (its kernels/ folder and PyPI's `kernels`, which transformers
    imports)."""
    added = [p for p in paths if p not in sys.path]
    sys.path.extend(added)
    try:
        yield
    finally:
        for p in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)


def _load_case(path: Path, builder: str) -> tuple[Any, Any, Any]:
    from torch import nn

    if not path.is_file():
        raise UserError(f"input {path} does not exist")
    name = "_slimc_case_" + re.sub(r"\W", "_", str(path.resolve()))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with _extra_sys_path([str(path.resolve().parent), os.getcwd()]):
        try:
            spec.loader.exec_module(module)
            fn = getattr(module, builder, None)
            if not callable(fn):
                raise UserError(f"{path} has no function {builder}()")
            result = fn()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{path}: {first_line(exc, with_type=True)}") from exc
    if isinstance(result, nn.Module):
        return result, None, None
    if isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], nn.Module):
        inputs = result[1]
        if inputs is not None and not isinstance(inputs, (tuple, list)):
            inputs = (inputs,)
        return result[0], inputs, result[2] if len(result) == 3 else None
    raise UserError(
        f"{path}:{builder}() must return (nn.Module, example_inputs[, calib]), "
        f"got {type(result).__name__}"
    )


def check_output_file(path: str, flag: str) -> None:
    """Check an output file path before any work: not a directory, in a writable directory.

    Raises:
        UserError: naming the flag and the path.
    """
    import tempfile

    out = Path(path).expanduser()
    if out.is_dir():
        raise UserError(f"{flag}: {path} is a directory; give a file name (OUT.pt2)")
    parent = out.absolute().parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag}: cannot write {path}: {ancestor} is not a directory")
    try:  # create and remove a file: the only sure test (root, /proc, read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".slimc-probe-", dir=ancestor)
    except OSError as exc:
        raise UserError(
            f"{flag}: cannot write {path}: cannot create files in {ancestor} "
            f"({exc.strerror or exc})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def load_input(args: argparse.Namespace, needs_calibration: bool) -> Program:
    """The program named by INPUT, captured (or loaded) and with calibration data if needed."""
    kind, path, builder = _split_input(args.input)
    if args.calib_data is not None and kind != "hf":
        raise UserError(
            f"--calib-data needs an HF model directory as INPUT (its tokenizer); {path} is a "
            + ("case file: return calib from its builder" if kind == "case" else ".pt2 program")
        )
    if kind == "pt2":
        from slimc.reproducer import load_program

        program, _ = load_program(path)
        if needs_calibration:
            log.warning("%s holds no calibration data; calibrating on its example inputs", path)
            program.calibration = [tuple(program.example_inputs)]
    elif kind == "case":
        from slimc.compiler import normalize_calibration

        model, inputs, calib = _load_case(path, builder)
        program = capture_model(model, inputs, canonicalize=not args.raw_capture)
        program.calibration = normalize_calibration(calib)
        if needs_calibration and program.calibration is None:
            raise UserError(
                f"the pipeline needs calibration data: make {path}:{builder}() "
                "return (model, example_inputs, calib)"
            )
    else:
        from slimc.data import load_causal_lm
        from slimc.model_dir import check_float_checkpoint, check_model_directory, load_tokenizer
        from slimc.tools._cli_args import calibration_from_args

        model_dir = check_model_directory(path)
        check_float_checkpoint(model_dir)
        tokenizer = load_tokenizer(model_dir)
        samples = calibration_from_args(args, tokenizer) if needs_calibration else None
        model = load_causal_lm(model_dir)
        program = capture_model(model, None, canonicalize=not args.raw_capture)
        if samples is not None:
            from slimc.compiler import check_token_ids

            program.calibration = [(ids,) for ids in samples]
            check_token_ids(model, program.calibration)
    from slimc.program import RunContext  # imports torch: not at `slimc-opt --help` time

    program.statistics.clear()
    program.context = RunContext(progress=sys.stderr.isatty())
    return program
