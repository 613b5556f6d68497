"""Pass-manager instrumentations: IR printing, timing, statistics and numerics tracking."""

from __future__ import annotations

import difflib
import fnmatch
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from slimc.ir.printer import print_program
from slimc.ir.verifier import verify

if TYPE_CHECKING:
    from slimc.pass_base import Pass, PassResult
    from slimc.program import Program

log = logging.getLogger(__name__)

Writer = Callable[[str], None]


class Instrumentation:
    """Hooks the pass manager calls around every pass; override what you need."""

    def before_pass(self, p: Pass, index: int, program: Program) -> None:
        """Called before pass number `index` (0-based) runs."""

    def after_pass(self, p: Pass, index: int, program: Program, result: PassResult) -> None:
        """Called after a pass succeeded."""

    def after_pass_failed(self, p: Pass, index: int, program: Program, exc: BaseException) -> None:
        """Called when a pass raised."""

    def after_pipeline(self, program: Program) -> None:
        """Called once when the whole pipeline finished."""


def _banner(when: str, p: Pass, index: int, total: int) -> str:
    return f"// -----// IR Dump {when} {p} ({index + 1}/{total}) //----- //"


@dataclass
class IRPrinter(Instrumentation):
    """Prints the IR before/after passes (MLIR's `--print-ir-*` family).

    Args:
        before / after: pass names to print around (`all` for every pass).
        only_changed: after a pass, print only when it reported a change.
        diff: print a unified diff against the IR before the pass instead of the whole IR.
        total: number of passes in the pipeline (for the banner).
    """

    write: Writer
    total: int
    before: frozenset[str] = frozenset()
    after: frozenset[str] = frozenset()
    only_changed: bool = False
    diff: bool = False
    print_loc: bool = True
    _last: str = ""

    def _text(self, program: Program) -> str:
        return print_program(program, loc=self.print_loc)

    def _wants(self, names: frozenset[str], p: Pass) -> bool:
        return "all" in names or p.name in names

    def before_pass(self, p: Pass, index: int, program: Program) -> None:
        if self.diff or self.only_changed:
            self._last = self._text(program)
        if self._wants(self.before, p):
            self.write(_banner("Before", p, index, self.total) + "\n" + self._text(program))

    def after_pass(self, p: Pass, index: int, program: Program, result: PassResult) -> None:
        # `after` filters which passes print; without it, diff/only_changed print every pass
        wanted = self._wants(self.after, p) if self.after else (self.diff or self.only_changed)
        if not wanted:
            return
        if (self.only_changed or self.diff) and not result.changed:
            return
        text = self._text(program)
        if self.diff:
            lines = difflib.unified_diff(
                self._last.splitlines(), text.splitlines(), "before", "after", lineterm="", n=1
            )
            self.write(_banner("Diff After", p, index, self.total) + "\n" + "\n".join(lines))
        else:
            self.write(_banner("After", p, index, self.total) + "\n" + text)

    def after_pass_failed(self, p: Pass, index: int, program: Program, exc: BaseException) -> None:
        self.write(_banner("After Failure of", p, index, self.total) + "\n" + self._text(program))


@dataclass
class Timer(Instrumentation):
    """Wall time per pass (`--time-passes`)."""

    times: list[tuple[str, float]] = field(default_factory=list)
    _start: float = 0.0

    def before_pass(self, p: Pass, index: int, program: Program) -> None:
        self._start = time.perf_counter()

    def after_pass(self, p: Pass, index: int, program: Program, result: PassResult) -> None:
        self.times.append((str(p), time.perf_counter() - self._start))

    def report(self) -> str:
        total = sum(t for _, t in self.times) or 1e-12
        lines = [
            "===-------------------------------------------------------------===",
            "                      Pass execution timing report",
            "===-------------------------------------------------------------===",
            f"  Total Execution Time: {total:.4f} seconds",
            "",
            "   ---Wall Time---  --- Name ---",
        ]
        for name, t in self.times:
            lines.append(f"   {t:8.4f} ({100 * t / total:5.1f}%)  {name}")
        lines.append(f"   {total:8.4f} (100.0%)  Total")
        return "\n".join(lines)


def format_statistics(program: Program) -> str:
    """The per-pass counters passes recorded with `Pass.stat` (`--pass-statistics`)."""
    lines = [
        "===-------------------------------------------------------------===",
        "                          ... Pass statistics report ...",
        "===-------------------------------------------------------------===",
    ]
    for pass_name, counters in program.statistics.items():
        lines.append(pass_name)
        for key, value in sorted(counters.items()):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            lines.append(f"  ({shown}) {key}")
    return "\n".join(lines)


@dataclass
class Verifier(Instrumentation):
    """Runs the IR verifier after every pass (on by default, as in MLIR)."""

    def after_pass(self, p: Pass, index: int, program: Program, result: PassResult) -> None:
        verify(program, after=str(p))


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref, act = reference.double(), actual.double()
    noise = (ref - act).pow(2).mean().item()
    signal = ref.pow(2).mean().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclass
class NumericsTracker(Instrumentation):
    """After each pass, runs one fixed input and reports SQNR / max error against the float model.

    Exact transforms must stay within float tolerance; lossy ones show their cost per pass.
    """

    inputs: tuple[Any, ...]
    reference: torch.Tensor | None = None
    rows: list[tuple[str, float, float, float]] = field(default_factory=list)
    metric: Literal["sqnr"] = "sqnr"
    only: str = "*"

    def _run(self, program: Program) -> torch.Tensor:
        with torch.inference_mode():
            out = program(*self.inputs)
        return _first_tensor(out).float()

    def before_pass(self, p: Pass, index: int, program: Program) -> None:
        if self.reference is None:
            self.reference = self._run(program)

    def after_pass(self, p: Pass, index: int, program: Program, result: PassResult) -> None:
        if not fnmatch.fnmatch(p.name, self.only) or self.reference is None:
            return
        out = self._run(program)
        err = (out - self.reference).abs()
        rel = (err.max() / self.reference.abs().max().clamp_min(1e-30)).item()
        self.rows.append((str(p), sqnr_db(self.reference, out), err.max().item(), rel))

    def report(self) -> str:
        lines = [
            "numerics vs float model (first output):",
            f"  {'pass':40s} {'SQNR dB':>9s} {'max abs err':>12s} {'max rel err':>12s}",
        ]
        for name, sqnr, max_abs, rel in self.rows:
            lines.append(f"  {name[:40]:40s} {sqnr:9.2f} {max_abs:12.4g} {rel:12.4g}")
        return "\n".join(lines)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise TypeError(f"cannot find a tensor output in {type(out).__name__}")
