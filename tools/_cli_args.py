"""Arguments shared by slimc's CLIs: numbers checked at parse time, calibration flags, --ignore checks."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_CALIB_SAMPLES = 128
"""Samples of the packaged calibration text when --calib-samples is not given."""


def int_at_least(low: int, what: str = "a number") -> Callable[[str], int]:
    """An argparse `type`: an integer >= `low`, refused at parse time otherwise."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return convert


def group_size(text: str) -> int:
    """An argparse `type` for --group-size: -1 (per output channel) or a positive size."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(
            f"expected -1 (per output channel) or a positive group size, got {value}"
        )
    return value


def add_calibration_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """--calib-data, --calib-samples and --calib-seq-len."""
    parser.add_argument(
        "--calib-data",
        default=None,
        metavar="FILE",
        help="calibrate on your own text instead of the packaged Wikipedia leads: FILE.jsonl "
        'holds one JSON object per line with the sample in its "text" string, FILE.txt holds '
        "samples separated by blank lines; each sample is tokenized with the tokenizer's own "
        "special tokens and cut to --calib-seq-len tokens",
    )
    parser.add_argument(
        "--calib-samples",
        type=int_at_least(1, "a positive number of samples"),
        default=None,
        metavar="N",
        help=f"calibration samples for passes that need data (static activations, smoothing, "
        f"gptq): the first N of --calib-data (an error if it holds fewer; default: all of "
        f"them), or of the packaged text (default {DEFAULT_CALIB_SAMPLES})",
    )
    parser.add_argument(
        "--calib-seq-len",
        type=int_at_least(1, "a positive number of tokens"),
        default=512,
        metavar="N",
        help="tokens per calibration sample; longer samples are truncated (default 512)",
    )


def calibration_from_args(args: argparse.Namespace, tokenizer: Any) -> list[Any]:
    """The calibration samples the flags ask for (token-id tensors [1, L]).

    Raises:
        slimc.errors.UserError: a bad --calib-data file (see `slimc.calib_file`).
    """
    if args.calib_data is not None:
        from slimc.calib_file import calibration_file_samples

        return calibration_file_samples(
            tokenizer, args.calib_data, n=args.calib_samples, seqlen=args.calib_seq_len
        )
    from slimc.data import calibration_samples

    n = DEFAULT_CALIB_SAMPLES if args.calib_samples is None else args.calib_samples
    return calibration_samples(tokenizer, n=n, seqlen=args.calib_seq_len)


def open_work_dir(
    args: argparse.Namespace, model_dir: Path, pm: Any, calib: Any, suffix: str = ""
) -> Any:
    """The run's work directory (`--work-dir`, default `<save>.work`, with `suffix` for a
    rank other than 0 of a distributed run): created, or with `--resume` reopened after
    checking it is this run's. None when nothing is saved.

    Raises:
        UserError: --resume / --work-dir without --save, or a work directory that is not this
            run's (see `WorkDir.open`).
    """
    from slimc.errors import UserError
    from slimc.work_dir import WorkDir, fingerprint_files, fingerprint_tensors

    if args.save is None:
        if args.resume or args.work_dir is not None:
            flag = "--resume" if args.resume else "--work-dir"
            raise UserError(f"{flag} needs --save (the work directory belongs to a saved run)")
        return None
    path = Path(args.work_dir) if args.work_dir else Path(f"{Path(args.save).expanduser()}.work")
    path = path.with_name(path.name + suffix)
    model_files = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json")]
    samples = [
        t for sample in calib or () for t in (sample if isinstance(sample, tuple) else (sample,))
    ]
    fingerprint = {
        "model": fingerprint_files(model_files),
        "pipeline": pm.pipeline_spec(include_defaults=True),
        "calibration": fingerprint_tensors(samples),
    }
    if suffix:  # a rank > 0 of a distributed run: never resumed, so one a failed run left goes
        fingerprint["rank"] = suffix
        WorkDir.remove_stale(path, "rank")
    return WorkDir.open(path, fingerprint, resume=args.resume)


def ignore_patterns(args: argparse.Namespace) -> list[str] | None:
    """The globs `--ignore` / `--no-ignore` ask for: None = the pass default (lm_head)."""
    if args.no_ignore:
        return []
    if args.ignore is None:
        return None
    return [g for g in args.ignore if g.strip()]  # `--ignore ''` ignores nothing


def _linear_paths(model: Any) -> list[str]:
    """The names --ignore matches: linear modules, and MoE expert stacks (`...experts.down_proj`)."""
    from torch import nn

    paths = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            paths.append(name)
        elif hasattr(module, "has_gate"):  # a transformers experts module: stacked weights
            stacks = ("gate_up_proj", "up_proj", "down_proj")
            paths.extend(f"{name}.{s}" for s in stacks if s in module._parameters)
    return paths


def check_ignore_patterns(model: Any, patterns: list[str] | None) -> None:
    """Refuse an --ignore glob that matches no linear (a typo would quantize lm_head silently)."""
    from slimc.errors import UserError
    from slimc.linear_select import matches  # imports torch: not at `slimc --help` time

    linears = _linear_paths(model)
    for pattern in patterns or ():
        if not any(matches(path, (pattern,)) for path in linears):
            example = f" (linears are named like {linears[-1]!r})" if linears else ""
            raise UserError(f"--ignore {pattern!r} matches no linear of the model{example}")
