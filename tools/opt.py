"""slimc-opt: run a pass pipeline on a model, a case file or a .pt2 program and print the IR."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import logging
import sys
import traceback
import typing
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from slimc import registry
from slimc.errors import UserError, first_line
from slimc.heap import return_freed_memory_to_os
from slimc.instrumentation import IRPrinter
from slimc.pass_base import PassFailure
from slimc.pipeline_spec import PipelineSyntaxError
from slimc.stage import Stage
from slimc.tools._cli_args import add_calibration_arguments
from slimc.tools.opt_inputs import check_output_file, load_input
from slimc.tools.pass_reference import list_passes

if typing.TYPE_CHECKING:
    from slimc.analysis import AnalysisManager
    from slimc.pass_manager import PassManager, Step
    from slimc.program import Program

PROG = "slimc-opt"
log = logging.getLogger(__name__)

EPILOG = """\
INPUT is an HF model directory, a Python file case.py[:builder] whose builder (default build)
returns (nn.Module, example_inputs[, calib]), or a .pt2 file (slimc-opt -o output or a crash
reproducer; without -p the pipeline stored in it runs). The final IR and --print-ir-* dumps go
to stdout; reports (--time-passes, --pass-statistics, --track-error, --print-analyses) and errors
go to stderr.
"""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", nargs="?", metavar="INPUT", help="model dir, case.py[:builder] or .pt2")
    p.add_argument(
        "-p",
        "--passes",
        metavar="PIPELINE",
        default=None,
        help="pass pipeline, e.g. 'linear-quant{scheme=w4a16 group-size=128}' or 'w8a8'",
    )
    p.add_argument("-o", "--output", metavar="OUT.pt2", help="write the final program as .pt2")
    p.add_argument("--list-passes", action="store_true", help="list passes and named pipelines")
    p.add_argument("--format", choices=("text", "md"), default="text", help="--list-passes format")
    p.add_argument(
        "--print-pipeline",
        action="store_true",
        help="print the expanded pipeline with every default (exits if no INPUT)",
    )
    add_calibration_arguments(p.add_argument_group("calibration (HF model directories)"))
    p.add_argument(
        "--raw-capture",
        action="store_true",
        help="keep the exported graph as is (skip the canonicalize capture runs)",
    )
    g = p.add_argument_group("IR printing")
    g.add_argument("--print-ir-before", metavar="P[,P]", default="", help="dump IR before passes")
    g.add_argument("--print-ir-after", metavar="P[,P]", default="", help="dump IR after passes")
    g.add_argument("--print-ir-before-all", action="store_true", help="dump IR before every pass")
    g.add_argument("--print-ir-after-all", action="store_true", help="dump IR after every pass")
    g.add_argument(
        "--print-ir-after-change",
        action="store_true",
        help="dump IR after passes that changed it (all, or those of --print-ir-after)",
    )
    g.add_argument(
        "--print-ir-after-failure", action="store_true", help="dump IR after a pass that failed"
    )
    g.add_argument(
        "--print-changed",
        nargs="?",
        const="full",
        choices=("full", "diff"),
        help="print the IR after each pass that changed it; --print-changed=diff "
        "prints a unified diff against the IR before the pass",
    )
    g.add_argument("--no-loc", action="store_true", help="omit loc(...) annotations")
    d = p.add_argument_group("debugging")
    d.add_argument("--time-passes", action="store_true", help="report wall time per pass")
    d.add_argument("--pass-statistics", action="store_true", help="report pass counters")
    d.add_argument(
        "--track-error",
        action="store_true",
        help="report SQNR / max error vs the float program after each pass",
    )
    d.add_argument(
        "--print-analyses",
        action="store_true",
        help="after the pipeline (or on the input, without -p), describe every cached analysis "
        "and linear-groups (computed if not cached); add require<activation-stats> to the "
        "pipeline to see activation statistics",
    )
    d.add_argument("--bisect-limit", type=int, metavar="N", help="run only the first N passes")
    d.add_argument("--no-verify", action="store_true", help="do not verify the IR after each pass")
    d.add_argument(
        "--crash-reproducer",
        metavar="PATH",
        help="on a pass failure, write the IR before it with the rest of the pipeline",
    )
    d.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    d.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    return p


# -- pipeline and instrumentation -----------------------------------------------------------------
def _check_pass_names(flag: str, text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    known = registry.all_pass_names()
    for name in sorted(names - {"all", *known}):
        hint = difflib.get_close_matches(name, known, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UserError(f"{flag}: unknown pass {name!r}{suggestion}")
    return names


@dataclasses.dataclass
class _Printer(IRPrinter):
    """IRPrinter that dumps the IR after a failing pass only when asked to."""

    after_failure: bool = False

    def after_pass_failed(self, p: Any, index: int, program: Program, exc: BaseException) -> None:
        if self.after_failure:
            super().after_pass_failed(p, index, program, exc)


def _instrumentations(
    args: argparse.Namespace, steps: list[Step], program: Program
) -> dict[str, Any]:
    from slimc.instrumentation import NumericsTracker, Timer

    insts: dict[str, Any] = {}
    if args.time_passes:
        insts["timer"] = Timer()
    before = set(args.before) | ({"all"} if args.print_ir_before_all else set())
    after = set(args.after) | ({"all"} if args.print_ir_after_all else set())
    printing = args.print_ir_after_change or args.print_changed or args.print_ir_after_failure
    if before or after or printing:
        insts["printer"] = _Printer(
            write=lambda text: print(text, file=sys.stdout),
            total=len(steps),
            before=frozenset(before),
            after=frozenset(after),
            only_changed=bool(args.print_ir_after_change or args.print_changed == "full"),
            diff=args.print_changed == "diff",
            print_loc=not args.no_loc,
            after_failure=args.print_ir_after_failure,
        )
    if args.track_error:
        insts["tracker"] = NumericsTracker(inputs=tuple(program.example_inputs))
    return insts


def _needs_calibration(pm: PassManager) -> bool:
    """Whether a pass, or an analysis the pipeline requires, runs on calibration data."""
    from slimc.pass_manager import AnalysisDirective

    return pm.needs_calibration or any(
        isinstance(s, AnalysisDirective)
        and s.name == "require"
        and getattr(registry.get_analysis(s.analysis), "needs_calibration", False)
        for s in pm.steps
    )


def describe_analyses(am: AnalysisManager) -> str:
    """`--print-analyses`: linear-groups (computed if not cached), experts (for a MoE model),
    then every other cached one."""
    from slimc.analyses.experts import Experts
    from slimc.analyses.linear_groups import LinearGroups

    blocks = [am.get(LinearGroups).describe()]
    if (experts := am.get(Experts)).layers:
        blocks.append(experts.describe())
    for name in sorted(registry.ANALYSES):
        cls = registry.get_analysis(name)
        analysis = am.cached(cls) if cls not in (LinearGroups, Experts) else None
        if analysis is not None:
            describe = getattr(analysis, "describe", None)
            blocks.append(describe() if callable(describe) else f"{name}: cached")
    return "\n".join(blocks)


def _run(args: argparse.Namespace) -> int:
    from slimc.analysis import AnalysisManager
    from slimc.ir.printer import print_program
    from slimc.pass_manager import PassManager

    if args.list_passes:
        print(list_passes(args.format), end="" if args.format == "md" else "\n")
        return 0
    if args.input is None and not args.print_pipeline:
        raise UserError("no INPUT given (see --help)")
    args.before = _check_pass_names("--print-ir-before", args.print_ir_before)
    args.after = _check_pass_names("--print-ir-after", args.print_ir_after)
    stage, pipeline = Stage.ATEN, args.passes or ""
    if args.input and args.input.endswith(".pt2") and Path(args.input).is_file():
        from slimc.reproducer import PIPELINE_FILE, read_metadata, stage_of

        meta = read_metadata(args.input)
        stage = stage_of(meta)
        if args.passes is None:
            pipeline = meta[PIPELINE_FILE]
    checked = PassManager.parse(pipeline, start_stage=stage, verify_each=False)  # before loading
    if args.output:
        check_output_file(args.output, "-o")
    steps = checked.steps
    if args.print_pipeline:
        print(checked.pipeline_spec(include_defaults=True))
        if args.input is None:
            return 0
    program = load_input(args, _needs_calibration(checked))
    insts = _instrumentations(args, steps, program)
    am = AnalysisManager(program)
    pm = PassManager(
        steps,
        start_stage=program.stage,
        instrumentations=list(insts.values()),
        verify_each=not args.no_verify,
        bisect_limit=args.bisect_limit,
        crash_reproducer=args.crash_reproducer,
    )
    try:
        pm.run(program, am)
    finally:
        _reports(args, insts, program)
    if args.print_analyses:
        print(describe_analyses(am), file=sys.stderr)
    print(print_program(program, loc=not args.no_loc))
    if args.output:
        from slimc.reproducer import save_program

        try:
            save_program(program, args.output)
        except OSError as exc:
            raise UserError(f"-o: cannot write {args.output} ({exc.strerror or exc})") from exc
    return 0


def _reports(args: argparse.Namespace, insts: dict[str, Any], program: Program) -> None:
    from slimc.instrumentation import format_statistics

    if "timer" in insts:
        print(insts["timer"].report(), file=sys.stderr)
    if args.pass_statistics:
        print(format_statistics(program), file=sys.stderr)
    if "tracker" in insts:
        print(insts["tracker"].report(), file=sys.stderr)


# -- errors and logging -------------------------------------------------------------------------
def error_lines(exc: BaseException) -> list[str]:
    """`exc` as one error line, plus a note with the reproduce command for pass failures."""
    first = first_line(exc).rstrip(":")
    ctx = exc.__context__
    if isinstance(ctx, PipelineSyntaxError):
        near = ctx.text[ctx.pos : ctx.pos + 16]
        first += f" (near {near!r})" if near else " (at end of input)"
    out = [f"{PROG}: error: {first}"]
    if isinstance(exc, PassFailure) and exc.reproducer:
        out.append(f"{PROG}: note: reproduce with: {PROG} {exc.reproducer}")
    return out


@contextlib.contextmanager
def _logging(args: argparse.Namespace) -> Iterator[None]:
    handler = logging.StreamHandler(sys.stderr)  # the stderr of this call (tests redirect it)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    root, pm_log = logging.getLogger("slimc"), logging.getLogger("slimc.pass_manager")
    saved = root.level, pm_log.level
    root.addHandler(handler)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    root.setLevel(level)
    if args.bisect_limit is not None and not args.debug:
        pm_log.setLevel(logging.INFO)  # "BISECT: NOT running pass (n) ..."
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        pm_log.setLevel(saved[1])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `slimc-opt`; returns the exit code (1 for user errors)."""
    args = make_parser().parse_args(list(argv) if argv is not None else None)
    return_freed_memory_to_os()
    with _logging(args), warnings.catch_warnings():
        # deep copies of programs (crash reproducer snapshots) copy torch pytree specs, which warn
        warnings.filterwarnings("ignore", "`isinstance.treespec, LeafSpec.`", FutureWarning)
        try:
            return _run(args)
        except (UserError, PassFailure) as exc:
            if args.debug:
                traceback.print_exc(file=sys.stderr)
            for line in error_lines(exc):
                print(line, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
