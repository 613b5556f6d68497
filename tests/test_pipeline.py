"""Core pass infrastructure: pipeline grammar, options, named pipelines, stages, analyses, failures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from torch import fx, nn

from slimc import registry
from slimc.analysis import AnalysisManager
from slimc.errors import PipelineError, UserError
from slimc.instrumentation import Instrumentation
from slimc.pass_base import OptionError, Pass, PassFailure, PassResult, Preserved, option
from slimc.pass_manager import PassManager, check_stages, expand
from slimc.pipeline_spec import PassSpec, PipelineSyntaxError, format_pipeline, parse_pipeline
from slimc.program import Program
from slimc.stage import Stage


# -- test passes and analyses (registered per test with monkeypatch) --------------------------------
class Counted:
    """A dummy analysis that counts how often it was computed."""

    name = "counted"
    computed = 0

    @classmethod
    def compute(cls, program: Program, am: AnalysisManager) -> Counted:
        cls.computed += 1
        return cls()


@dataclass(frozen=True, kw_only=True)
class Record(Pass):
    """Append the pass name to program.metadata['ran']; preserve what `keep` says."""

    name = "test-record"
    accepts = frozenset(Stage)
    keep: Literal["all", "none", "counted"] = option("all", "Which analyses survive.")

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        program.metadata.setdefault("ran", []).append(self.name)
        program.metadata.setdefault("cached", []).append(am.cached(Counted) is not None)
        preserved = {
            "all": Preserved.everything(),
            "none": Preserved.none(),
            "counted": Preserved.of(Counted),
        }[self.keep]
        return PassResult(changed=self.keep == "none", preserved=preserved)


@dataclass(frozen=True, kw_only=True)
class Boom(Pass):
    """Raise (RuntimeError, or UserError with user=true)."""

    name = "test-boom"
    accepts = frozenset(Stage)
    user: bool = option(False, "Raise a UserError instead.")

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        if self.user:
            raise UserError("bad input for test-boom")
        raise RuntimeError("kaboom")


@dataclass(frozen=True, kw_only=True)
class Typed(Pass):
    """Options of every supported type."""

    name = "test-typed"
    accepts = frozenset(Stage)
    flag: bool = option(False, "A bool.")
    count: int = option(3, "An int.")
    ratio: float = option(0.5, "A float.")
    label: str = option("x", "A string.")
    maybe: int | None = option(None, "An optional int.")
    mode: Literal["fast", "exact"] = option("fast", "A choice.")
    names: tuple[str, ...] = option(("a",), "A list of strings.")
    sizes: tuple[int, ...] = option((), "A list of ints.")

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        return PassResult(changed=False, preserved=Preserved.everything())


@pytest.fixture
def test_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in (Record, Boom, Typed):
        monkeypatch.setitem(registry.PASSES, cls.name, f"{__name__}:{cls.__name__}")
    monkeypatch.setitem(registry.ANALYSES, "counted", f"{__name__}:Counted")
    Counted.computed = 0


def tiny_program(stage: Stage = Stage.ATEN) -> Program:
    return Program(fx.symbolic_trace(nn.ReLU()), stage=stage, example_inputs=(torch.ones(2),))


# -- grammar: round trip and errors ---------------------------------------------------------------
CANONICAL = [
    "",
    "canonicalize",
    "linear-quant{scheme=w4a16 group-size=128}",
    "a{xs=1,2,3},b,c{y=-1.5}",
    'a{msg="hello, world" path="x y"}',
    'a{s="quote \\" inside"}',
    'a{empty=""}',
    "a{ignore=lm_head,model.layers.0.*}",
    'a{globs="*{x}*","a=b"}',
    "require<counted>,invalidate<all>,b",
    "w4a16{group-size=64},canonicalize",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_print_parse_round_trip(text: str) -> None:
    specs = parse_pipeline(text)
    assert format_pipeline(specs) == text
    assert parse_pipeline(format_pipeline(specs)) == specs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" a { k = v } , b ", "a{k=v},b"),
        ("a{flag}", "a{flag=true}"),
        ('a{ignore="lm_head","model.layers.0.*"}', "a{ignore=lm_head,model.layers.0.*}"),
        ('a{k="plain"}', "a{k=plain}"),
    ],
)
def test_parse_normalizes(text: str, expected: str) -> None:
    assert format_pipeline(parse_pipeline(text)) == expected
    assert parse_pipeline(expected) == parse_pipeline(text)


def test_parsed_values() -> None:
    (a,) = parse_pipeline('a{msg="hello, world" xs=1,"2 3" flag}')
    assert a == PassSpec("a", {"msg": ("hello, world",), "xs": ("1", "2 3"), "flag": ("true",)})
    (r,) = parse_pipeline("require<counted>")
    assert (r.name, r.analysis, r.options) == ("require", "counted", {})


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("a{b=1", 6, "expected '}'"),
        ("a,,b", 3, "expected a pass name"),
        ("a{k=}", 5, "expected an option value"),
        ("a{k=1,}", 7, "expected an option value"),
        ("a{k=1 k=2}", 7, "option 'k' given twice"),
        ("a b", 3, "unexpected 'b'"),
        ("a}", 2, "unexpected '}'"),
        ('a{s="abc}', 10, "unterminated string"),
        ("require<x", 10, "expected '>', found end of input"),
        ("a{=1}", 3, "expected an option name"),
    ],
)
def test_syntax_errors_point_at_column(text: str, column: int, message: str) -> None:
    with pytest.raises(PipelineSyntaxError) as e:
        parse_pipeline(text)
    assert e.value.pos + 1 == column
    first, shown, pointer = str(e.value).splitlines()
    assert first == f"{message} at column {column}:"
    assert shown.strip() == text.strip()
    assert pointer.index("^") - 2 == column - 1  # two-space indent, caret under the column


def test_syntax_error_through_pass_manager() -> None:
    with pytest.raises(PipelineError, match=r"bad pipeline: expected '\}' at column 26"):
        PassManager.parse("linear-quant{scheme=w4a16")


# -- named pipelines --------------------------------------------------------------------------------
def test_named_pipeline_expansion_forwards_options() -> None:
    specs = expand(parse_pipeline("w4a16{group-size=64},canonicalize"))
    assert format_pipeline(specs) == (
        "linear-quant{scheme=w4a16 group-size=64},fuse-quantized-linear,canonicalize"
    )
    pm = PassManager.parse("w4a16{group-size=64}")
    assert pm.pipeline_spec() == "linear-quant{scheme=w4a16 group-size=64},fuse-quantized-linear"
    full = pm.pipeline_spec(include_defaults=True)
    assert full.startswith(
        "linear-quant{scheme=w4a16 group-size=64 symmetric=none observer=histogram"
    )
    assert PassManager.parse(full).pipeline_spec(True) == full  # the full form round-trips


def test_named_pipeline_option_overrides_its_default() -> None:
    pm = PassManager.parse("w8a16{scheme=w4a16}")
    assert pm.steps[0].scheme == "w4a16"


@pytest.mark.parametrize("name", sorted(registry.PIPELINES))
def test_every_named_pipeline_builds(name: str) -> None:
    from slimc.quant.linear_engine import LinearQuantEngine

    pm = PassManager.parse(name)
    quantizers = [s for s in pm.steps if isinstance(s, LinearQuantEngine)]  # linear-quant, gptq, ...
    first = pm.steps.index(quantizers[0])
    assert pm.steps[-1].name == "fuse-quantized-linear"
    assert pm.steps[first:-1] == quantizers  # quantizers run last, then fusion
    assert all(s.exact for s in pm.steps[:first])  # before quantization: exact smoothing/rotation
    if name == "laos":  # mixed precision: W8A8 attention, down_proj, sensitive MLPs; W4A4 rest
        assert [q.scheme for q in quantizers] == ["w8a8-dynamic", "w4a4"]
        assert quantizers[0].sensitive_fraction == 0.3
        assert quantizers[0].sensitive_modules == ("*gate_proj", "*up_proj")
    else:
        assert len(quantizers) == 1 and name.startswith(quantizers[0].scheme)
    assert pm.end_stage is Stage.FUSED


def test_recipe_options_reach_every_pass_that_declares_them() -> None:
    pm = PassManager.parse("w8a8-iter-smooth{alpha=0.7 observer=minmax}")
    assert pm.steps[0].alpha == 0.7
    assert pm.steps[1].observer == "minmax" and pm.steps[1].scheme == "w8a8"
    with pytest.raises(PipelineError, match="has no option 'bogus'"):
        PassManager.parse("w8a8-iter-smooth{bogus=1}")


def test_registry_names_match_classes() -> None:
    for name in registry.all_pass_names():
        cls = registry.get_pass(name)
        assert cls.name == name
        assert cls.summary(), f"{name} has no docstring"
        assert not set(registry.PIPELINES) & {name}


def test_unknown_pass_suggests_close_name() -> None:
    with pytest.raises(
        PipelineError, match=r"unknown pass 'linear-quantt' \(did you mean 'linear-quant'\?\)"
    ):
        PassManager.parse("linear-quantt")
    with pytest.raises(PipelineError, match=r"did you mean 'w4a16'"):
        PassManager.parse("w4a61")


def test_analysis_directive_errors(test_passes: None) -> None:
    with pytest.raises(PipelineError, match="unknown analysis 'nope'"):
        PassManager.parse("require<nope>")
    with pytest.raises(PipelineError, match="'canonicalize' takes no <analysis>"):
        PassManager.parse("canonicalize<counted>")
    assert PassManager.parse("require<counted>,invalidate<all>").pipeline_spec() == (
        "require<counted>,invalidate<all>"
    )


# -- options ----------------------------------------------------------------------------------------
def test_typed_options(test_passes: None) -> None:
    (p,) = PassManager.parse(
        'test-typed{flag count=-2 ratio=1e-3 label="a b" maybe=7 mode=exact names=x,"y,z" sizes=1,2}'
    ).steps
    assert (p.flag, p.count, p.ratio, p.label, p.maybe, p.mode) == (
        True,
        -2,
        1e-3,
        "a b",
        7,
        "exact",
    )
    assert (p.names, p.sizes) == (("x", "y,z"), (1, 2))
    assert (
        str(p)
        == 'test-typed{flag=true count=-2 ratio=0.001 label="a b" maybe=7 mode=exact names=x,"y,z" sizes=1,2}'
    )
    (d,) = PassManager.parse('test-typed{maybe=none names="" flag=off}').steps
    assert (d.maybe, d.names, d.flag) == (None, (), False)
    assert str(d) == 'test-typed{names=""}'
    full = str(d.spec(include_defaults=True))
    assert full == (
        'test-typed{flag=false count=3 ratio=0.5 label=x maybe=none mode=fast names="" sizes=""}'
    )
    assert PassManager.parse(full).steps == [d]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("test-typed{count=abc}", r"option 'count' of pass 'test-typed': bad value 'abc'"),
        ("test-typed{count=1,2}", r"bad value '1,2' \(expected a single value\)"),
        ("test-typed{flag=maybe}", r"bad value 'maybe' \(expected true or false\)"),
        ("test-typed{mode=slow}", r"bad value 'slow' \(expected one of fast, exact\)"),
        ("test-typed{ratio=x}", r"option 'ratio'"),
        ("test-typed{sizes=1,x}", r"option 'sizes' of pass 'test-typed': bad value '1,x'"),
        ("test-typed{maybe=many}", r"option 'maybe'"),
        (
            "test-typed{colour=red}",
            r"pass 'test-typed' has no option 'colour' \(options: flag, count,",
        ),
        (
            "linear-quant{group-size=abc}",
            r"option 'group-size' of pass 'linear-quant': bad value 'abc'",
        ),
    ],
)
def test_option_errors(test_passes: None, text: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        PassManager.parse(text)


def test_option_conversion_error_type() -> None:
    with pytest.raises(OptionError):
        Typed.from_options({"count": ("x",)})
    with pytest.raises(TypeError, match="immutable"):
        option([1], "a list default is shared between instances")


def test_pass_objects_are_frozen(test_passes: None) -> None:
    p = Typed(count=5)
    with pytest.raises(AttributeError):
        p.count = 6  # type: ignore[misc]
    assert (
        PassManager.parse([p, "test-record"]).pipeline_spec() == "test-typed{count=5},test-record"
    )


# -- stages ----------------------------------------------------------------------------------------
def test_stage_checks() -> None:
    with pytest.raises(
        PipelineError,
        match=r"'fuse-quantized-linear' \(position 1\) runs on the qdq stage, "
        r"but the program is at the aten stage",
    ):
        PassManager.parse("fuse-quantized-linear")
    with pytest.raises(
        PipelineError, match=r"'linear-quant' \(position 3\) runs on the aten/qdq stage"
    ):
        PassManager.parse("w8a16,linear-quant")
    steps = PassManager.parse("fuse-quantized-linear", start_stage=Stage.QDQ).steps
    assert check_stages(steps, Stage.QDQ) is Stage.FUSED
    assert PassManager.parse("canonicalize", start_stage=Stage.KERNEL).end_stage is Stage.KERNEL


def test_run_refuses_program_at_other_stage(test_passes: None) -> None:
    pm = PassManager.parse("test-record", verify_each=False)
    with pytest.raises(
        PipelineError, match="starts at the aten stage but the program is at the qdq"
    ):
        pm.run(tiny_program(Stage.QDQ))


def test_stage_parse() -> None:
    assert Stage.parse("QDQ") is Stage.QDQ
    with pytest.raises(ValueError, match="expected one of aten, qdq, fused, kernel"):
        Stage.parse("lowered")


# -- analyses and preservation ------------------------------------------------------------------------
def test_analysis_manager_caches_and_invalidates() -> None:
    Counted.computed = 0
    am = AnalysisManager(tiny_program())
    assert am.cached(Counted) is None and Counted.computed == 0
    first = am.get(Counted)
    assert am.get(Counted) is first and Counted.computed == 1
    am.invalidate(Preserved.everything())
    am.invalidate(Preserved.of(Counted))
    assert am.cached(Counted) is first
    am.invalidate(Preserved.of(int))
    assert am.cached(Counted) is None
    am.get(Counted)
    assert Counted.computed == 2
    am.invalidate(Preserved.none())
    assert am.cached_names() == []
    am.set(Counted, first)
    assert am.cached_names() == ["counted"] and Counted.computed == 2


def test_preservation_through_pass_manager(test_passes: None) -> None:
    program = tiny_program()
    pipeline = (
        "require<counted>,test-record{keep=all},test-record{keep=counted},"
        "test-record{keep=none},test-record,require<counted>,invalidate<counted>,test-record"
    )
    PassManager.parse(pipeline, verify_each=False).run(program)
    assert program.metadata["cached"] == [True, True, True, False, False]
    assert Counted.computed == 2


def test_preserved_helpers() -> None:
    assert Preserved.everything().keeps(Counted)
    assert not Preserved.none().keeps(Counted)
    assert Preserved.of(Counted).keeps(Counted) and not Preserved.of(Counted).keeps(int)
    assert PassResult(changed=True).preserved == Preserved.none()


# -- running: failures, bisect, instrumentation ---------------------------------------------------------
def test_pass_failure_names_position(test_passes: None) -> None:
    pm = PassManager.parse("test-record,test-boom,test-record", verify_each=False)
    program = tiny_program()
    with pytest.raises(PassFailure) as e:
        pm.run(program)
    assert str(e.value) == "test-boom (pass 2/3) failed: RuntimeError: kaboom"
    assert (e.value.index, e.value.spec, e.value.reproducer) == (1, "test-boom", None)
    assert isinstance(e.value.cause, RuntimeError)
    assert program.metadata["ran"] == ["test-record"]


def test_user_errors_from_passes_pass_through(test_passes: None) -> None:
    with pytest.raises(UserError, match="bad input for test-boom") as e:
        PassManager.parse("test-boom{user}", verify_each=False).run(tiny_program())
    assert not isinstance(e.value, PassFailure)


def test_bisect_limit_runs_first_n(test_passes: None) -> None:
    program = tiny_program()
    PassManager.parse("test-record,test-typed,test-boom", verify_each=False, bisect_limit=2).run(
        program
    )
    assert program.metadata["ran"] == ["test-record"]


class Recorder(Instrumentation):
    """Records the instrumentation calls."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def before_pass(self, p: Pass, index: int, program: Program) -> None:
        self.events.append(f"before {p.name} {index}")

    def after_pass(self, p: Pass, index: int, program: Program, result: PassResult) -> None:
        self.events.append(f"after {p.name} changed={result.changed}")

    def after_pass_failed(self, p: Pass, index: int, program: Program, exc: BaseException) -> None:
        self.events.append(f"failed {p.name} {type(exc).__name__}")

    def after_pipeline(self, program: Program) -> None:
        self.events.append("done")


def test_instrumentation_hooks(test_passes: None) -> None:
    rec = Recorder()
    PassManager.parse(
        "test-record{keep=none},test-typed", instrumentations=[rec], verify_each=False
    ).run(tiny_program())
    assert rec.events == [
        "before test-record 0",
        "after test-record changed=True",
        "before test-typed 1",
        "after test-typed changed=False",
        "done",
    ]
    rec = Recorder()
    with pytest.raises(PassFailure):
        PassManager.parse("test-boom", instrumentations=[rec], verify_each=False).run(
            tiny_program()
        )
    assert rec.events == ["before test-boom 0", "failed test-boom RuntimeError"]


def test_verifier_failure_is_a_pass_failure(test_passes: None) -> None:
    # nodes without meta["val"] fail verification after the first pass
    with pytest.raises(PassFailure, match=r"test-record \(pass 1/1\) failed: VerificationError"):
        PassManager.parse("test-record").run(tiny_program())
