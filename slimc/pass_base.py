"""Pass, its options, results and failures: the contract every slimc pass follows."""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from slimc.pipeline_spec import OptionValue, PassSpec
from slimc.stage import Stage

if TYPE_CHECKING:
    from slimc.analysis import AnalysisManager
    from slimc.program import Program
    from slimc.quant.scheme import QuantTarget

CliRole = Literal["anti-outlier", "rotation", "weight-method", "lowering"]
"""Which choice of the command line a pass is: a `slimc quant --anti-outlier / --rotation /
--weight-method` choice, or a lowering (a target of the compile backend)."""


@dataclass(frozen=True)
class OptionCheck:
    """A constraint on an option's value, checked when a pipeline is parsed."""

    accepts: Callable[[Any], bool]
    expect: str
    """What a valid value is, for the error message ("-1 or a positive integer")."""


GROUP_SIZE = OptionCheck(
    lambda v: v == -1 or v > 0, "-1 (per output channel) or a positive group size"
)
"""The check of every `group-size` option."""


def option(
    default: Any,
    help: str,  # noqa: A002 - `help` mirrors argparse
    *,
    check: OptionCheck | None = None,
) -> Any:
    """Declare a pass option: a dataclass field with a default, help text and optional check."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass options must be immutable; use a tuple")
    metadata: dict[str, Any] = {"help": help}
    if check is not None:
        metadata["check"] = check
    return dataclasses.field(default=default, metadata=metadata)


class OptionError(ValueError):
    """An unknown option or a value of the wrong type, named in the message."""


@dataclass(frozen=True)
class Preserved:
    """Which analyses a pass leaves valid (MLIR's PreservedAnalyses)."""

    analyses: frozenset[type] = frozenset()
    all: bool = False

    @classmethod
    def none(cls) -> Preserved:
        return cls()

    @classmethod
    def everything(cls) -> Preserved:
        return cls(all=True)

    @classmethod
    def of(cls, *analyses: type) -> Preserved:
        return cls(frozenset(analyses))

    def keeps(self, analysis: type) -> bool:
        return self.all or analysis in self.analyses


@dataclass(frozen=True)
class PassResult:
    """What a pass did: whether the IR changed and which analyses survive."""

    changed: bool
    preserved: Preserved = Preserved()


@dataclass(frozen=True, kw_only=True)
class Pass(abc.ABC):
    """Base class of every pass. The first docstring line is the summary `--list-passes` shows.

    Subclasses are frozen dataclasses whose fields are the pass options (declared with
    `option(default, help)`); `name` is the kebab-case pipeline name.
    """

    name: ClassVar[str]
    accepts: ClassVar[frozenset[Stage]] = frozenset({Stage.ATEN})
    produces: ClassVar[Stage | None] = None
    needs_calibration: ClassVar[bool] = False
    calibrates_across_ranks: ClassVar[bool] = False
    """Whether what the pass gathers from calibration data is reduced over the ranks of a
    distributed run (`slimc.distributed`); a pass that needs calibration and says no is refused
    there, since each rank would search on its own samples only."""
    exact: ClassVar[bool] = True
    cli_role: ClassVar[CliRole | None] = None
    """The command-line choice this pass is (None: pipelines only). `slimc quant` offers every
    registered pass of a role as a choice of that role's flag, plugins included."""
    cli_choice: ClassVar[str | None] = None
    """The pass's name among its role's choices when it is not `name` (linear-quant is `rtn`)."""

    @abc.abstractmethod
    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        """Transform `program` in place and report what changed."""

    # -- options ---------------------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def for_scheme(cls, target: QuantTarget) -> dict[str, OptionValue]:
        """The options that set this pass up for a run quantizing to `target` (`slimc quant`).

        Passes that search against a quantizer return the quantizer `target` will use; the
        default is no option.
        """
        return {}

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field[Any]]:
        return list(dataclasses.fields(cls))

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, options: dict[str, OptionValue]) -> Pass:
        """Build the pass from raw pipeline options, checking names and types.

        Raises:
            OptionError: unknown option or a value that does not fit its type.
        """
        types_ = cls.option_types()
        checks = {f.name: f.metadata.get("check") for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            attr = key.replace("-", "_")
            if attr not in types_:
                known = ", ".join(_kebab(k) for k in types_) or "none"
                raise OptionError(f"pass {cls.name!r} has no option {key!r} (options: {known})")
            kwargs[attr] = convert_option(cls.name, key, raw, types_[attr])
            check = checks[attr]
            if check is not None and not check.accepts(kwargs[attr]):
                raise OptionError(
                    f"option {key!r} of pass {cls.name!r}: bad value {','.join(raw)!r} "
                    f"(expected {check.expect})"
                )
        return cls(**kwargs)

    def spec(self, include_defaults: bool = False) -> PassSpec:
        """This pass as a pipeline element; non-default options only unless asked."""
        opts: dict[str, OptionValue] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if include_defaults or value != f.default:
                opts[_kebab(f.name)] = format_option_value(value)
        return PassSpec(self.name, opts)

    def __str__(self) -> str:
        return str(self.spec())

    # -- statistics ------------------------------------------------------------------------
    def stat(self, program: Program, key: str, amount: int | float = 1) -> None:
        """Add to a named counter shown by `--pass-statistics`."""
        bucket = program.statistics.setdefault(self.name, {})
        bucket[key] = bucket.get(key, 0) + amount


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def format_option_value(value: Any) -> OptionValue:
    if value is None:
        return ("none",)
    if isinstance(value, bool):
        return ("true" if value else "false",)
    if isinstance(value, tuple):
        return tuple(str(v) for v in value) if value else ("",)
    return (str(value),)


def _convert_scalar(text: str, tp: Any) -> Any:
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if str(c) == text:
                return c
        raise ValueError(f"expected one of {', '.join(map(str, choices))}")
    raise TypeError(f"unsupported option type {tp!r}")


def convert_option(pass_name: str, key: str, raw: OptionValue, tp: Any) -> Any:
    """Convert raw option words to the declared type (int, float, bool, str, Literal, tuple, None)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    try:
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            if raw == ("none",):
                return None
            inner = [a for a in args if a is not type(None)]
            return convert_option(pass_name, key, raw, inner[0])
        if origin is tuple:
            elem = args[0]
            words: Iterable[str] = [w for w in raw if w != ""]
            return tuple(_convert_scalar(w, elem) for w in words)
        if len(raw) != 1:
            raise ValueError("expected a single value")
        return _convert_scalar(raw[0], tp)
    except ValueError as exc:
        shown = ",".join(raw)
        raise OptionError(
            f"option {key!r} of pass {pass_name!r}: bad value {shown!r} ({exc})"
        ) from None


class PassFailure(RuntimeError):
    """A pass raised; names its position in the pipeline and where a reproducer was written."""

    def __init__(
        self, spec: str, index: int, total: int, cause: BaseException, reproducer: str | None = None
    ) -> None:
        msg = f"{spec} (pass {index + 1}/{total}) failed: {type(cause).__name__}: {cause}"
        if reproducer:
            msg += f"\n  reproduce with: slimc-opt {reproducer}"
        super().__init__(msg)
        self.spec = spec
        self.index = index
        self.cause = cause
        self.reproducer = reproducer
