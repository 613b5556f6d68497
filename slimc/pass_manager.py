"""PassManager: parses pipelines, checks stages, runs passes with instrumentations."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from slimc import registry
from slimc.analysis import AnalysisManager
from slimc.errors import PipelineError, UserError
from slimc.instrumentation import Instrumentation, Verifier
from slimc.pass_base import OptionError, Pass, PassFailure, PassResult, Preserved
from slimc.pipeline_spec import PassSpec, PipelineSyntaxError, format_pipeline, parse_pipeline
from slimc.program import Program
from slimc.reproducer import write_reproducer
from slimc.stage import Stage
from slimc.weight_spill import spill_all

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisDirective:
    """The pseudo-passes `require<analysis>` and `invalidate<analysis|all>`."""

    name: str
    analysis: str

    def __str__(self) -> str:
        return f"{self.name}<{self.analysis}>"

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        if self.name == "invalidate":
            if self.analysis == "all":
                am.invalidate(Preserved.none())
            else:
                cls = registry.get_analysis(self.analysis)
                am.invalidate(Preserved(frozenset(c for c in am._cache if c is not cls)))
        else:
            am.get(registry.get_analysis(self.analysis))
        return PassResult(changed=False, preserved=Preserved.everything())


Step = Pass | AnalysisDirective


def expand(specs: Sequence[PassSpec]) -> list[PassSpec]:
    """Replace named pipelines by the passes they stand for."""
    out: list[PassSpec] = []
    for spec in specs:
        named = registry.PIPELINES.get(spec.name)
        try:
            out.extend(named.expand(spec.options) if named else [spec])
        except (registry.UnknownPassError, OptionError) as exc:
            raise PipelineError(str(exc)) from None
    return out


def build_step(spec: PassSpec) -> Step:
    """Instantiate one pipeline element, turning every problem into a PipelineError."""
    if spec.analysis is not None:
        if spec.name not in ("require", "invalidate"):
            raise PipelineError(
                f"{spec.name!r} takes no <analysis>; only require<...>/invalidate<...> do"
            )
        if not (spec.name == "invalidate" and spec.analysis == "all"):
            try:
                registry.get_analysis(spec.analysis)
            except registry.UnknownPassError as exc:
                raise PipelineError(str(exc)) from None
        return AnalysisDirective(spec.name, spec.analysis)
    try:
        cls = registry.get_pass(spec.name)
        return cls.from_options(spec.options)
    except (registry.UnknownPassError, OptionError) as exc:
        raise PipelineError(str(exc)) from None


def check_stages(steps: Sequence[Step], start: Stage) -> Stage:
    """Walk the pipeline's stages; refuse a pass placed on a stage it does not accept."""
    stage = start
    for i, step in enumerate(steps):
        if isinstance(step, AnalysisDirective):
            continue
        if stage not in step.accepts:
            wanted = "/".join(s.label for s in sorted(step.accepts))
            raise PipelineError(
                f"pass {step.name!r} (position {i + 1}) runs on the {wanted} stage, "
                f"but the program is at the {stage.label} stage there"
            )
        stage = step.produces if step.produces is not None else stage
    return stage


class PassManager:
    """Runs a checked sequence of passes over a Program.

    Args:
        steps: passes (and require/invalidate directives), in order; the list is the schedule.
        start_stage: stage of the programs this pipeline will run on.
        instrumentations: hooks around every pass.
        verify_each: run the IR verifier after every pass.
        bisect_limit: run only the first N passes (LLVM's `-opt-bisect-limit`).
        crash_reproducer: path of a `.pt2` written with the IR before a failing pass.
    """

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        start_stage: Stage = Stage.ATEN,
        instrumentations: Sequence[Instrumentation] = (),
        verify_each: bool = True,
        bisect_limit: int | None = None,
        crash_reproducer: str | None = None,
    ) -> None:
        self.steps = list(steps)
        self.start_stage = start_stage
        self.end_stage = check_stages(self.steps, start_stage)
        self.instrumentations = list(instrumentations)
        if verify_each:
            self.instrumentations.append(Verifier())
        self.bisect_limit = bisect_limit
        self.crash_reproducer = crash_reproducer

    @classmethod
    def parse(cls, pipeline: str | Sequence[str | Pass], **kwargs: object) -> PassManager:
        """Build from a pipeline string or a list of pass objects / pipeline strings.

        Raises:
            PipelineError: syntax error, unknown pass or option, bad value, wrong stage.
        """
        items = [pipeline] if isinstance(pipeline, str) else list(pipeline)
        steps: list[Step] = []
        for item in items:
            if isinstance(item, (Pass, AnalysisDirective)):
                steps.append(item)
                continue
            if not isinstance(item, str):
                raise PipelineError(f"pipeline items must be pass objects or strings, got {item!r}")
            try:
                specs = parse_pipeline(item)
            except PipelineSyntaxError as exc:
                raise PipelineError(f"bad pipeline: {exc}") from None
            steps.extend(build_step(s) for s in expand(specs))
        return cls(steps, **kwargs)  # type: ignore[arg-type]

    def pipeline_spec(self, include_defaults: bool = False) -> str:
        specs = [
            PassSpec(s.name, {}, s.analysis)
            if isinstance(s, AnalysisDirective)
            else s.spec(include_defaults)
            for s in self.steps
        ]
        return format_pipeline(specs)

    @property
    def needs_calibration(self) -> bool:
        return any(isinstance(s, Pass) and s.needs_calibration for s in self.steps)

    def run(self, program: Program, am: AnalysisManager | None = None) -> Program:
        """Run every pass in order on `program` (in place) and return it.

        Raises:
            PipelineError: the program is not at the stage this pipeline starts from.
            PassFailure: a pass raised; wraps the cause and names the pipeline position.
        """
        if program.stage != self.start_stage:
            raise PipelineError(
                f"pipeline starts at the {self.start_stage.label} stage but the program is at "
                f"the {program.stage.label} stage"
            )
        am = am or AnalysisManager(program)
        total = len(self.steps)
        for i, step in enumerate(self.steps):
            if isinstance(step, AnalysisDirective):
                step.run(program, am)
                continue
            if self.bisect_limit is not None and i >= self.bisect_limit:
                log.info("BISECT: NOT running pass (%d) %s", i + 1, step)
                continue
            self._run_one(step, i, total, program, am)
        for inst in self.instrumentations:
            inst.after_pipeline(program)
        return program

    def _run_one(self, p: Pass, i: int, total: int, program: Program, am: AnalysisManager) -> None:
        snapshot = copy.deepcopy(program) if self.crash_reproducer else None
        for inst in self.instrumentations:
            inst.before_pass(p, i, program)
        try:
            result = p.run(program, am)
            spill_all(program)  # what the pass wrote: to memory-mapped files, if the run has them
            if p.produces is not None:
                program.stage = p.produces
            for inst in self.instrumentations:
                inst.after_pass(p, i, program, result)
        except UserError:
            raise
        except Exception as exc:
            for inst in self.instrumentations:
                inst.after_pass_failed(p, i, program, exc)
            path = None
            if snapshot is not None and self.crash_reproducer:
                tail = [str(s) for s in self.steps[i:]]
                path = write_reproducer(snapshot, ",".join(tail), self.crash_reproducer)
            raise PassFailure(str(p), i, total, exc, path) from exc
        am.invalidate(result.preserved)
