"""The one registry of passes, named pipelines and analyses, loaded lazily by name."""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import pkgutil
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType

from slimc.pass_base import OptionError, Pass
from slimc.pipeline_spec import OptionValue, PassSpec

log = logging.getLogger(__name__)

PASS_PACKAGE = "slimc.passes"
"""The package of in-tree passes: every public module's `Pass` subclasses that declare a `name`."""

KERNEL_PACKAGE = "slimc.kernels"
"""The package of kernel families (`kernels/`), loaded only through the functions below."""

ENTRY_POINT_GROUP = "slimc.passes"
"""Entry-point group of plugin passes: `name = "module:Class"`, or a module or package whose
passes are found by the same convention as the in-tree ones."""


def discover_passes(package: str) -> dict[str, str]:
    """Pass name -> `module:Class` for the passes a module or package defines.

    By convention a pass is a non-abstract `Pass` subclass that declares its own `name` in a
    public module (no leading underscore) of the package, or in the module itself; classes
    imported from elsewhere count only in the module that defines them.

    Raises:
        RuntimeError: two classes declare the same name.
    """
    root = importlib.import_module(package)
    modules = [root]
    if hasattr(root, "__path__"):
        for info in sorted(pkgutil.iter_modules(root.__path__, package + "."), key=lambda i: i.name):
            if not info.name.rpartition(".")[2].startswith("_"):
                modules.append(importlib.import_module(info.name))
    found: dict[str, str] = {}
    for module in modules:
        for cls in vars(module).values():
            if not (
                isinstance(cls, type)
                and issubclass(cls, Pass)
                and cls.__module__ == module.__name__
                and "name" in vars(cls)
                and not inspect.isabstract(cls)
            ):
                continue
            ref = f"{module.__name__}:{cls.__qualname__}"
            if cls.name in found:
                raise RuntimeError(f"pass {cls.name!r} is declared twice: {found[cls.name]} and {ref}")
            found[cls.name] = ref
    return dict(sorted(found.items()))


class _PassTable(MutableMapping[str, str]):
    """A name -> `module:Class` table filled from a package on first use."""

    def __init__(self, package: str) -> None:
        self._package = package
        self._table: dict[str, str] | None = None

    def _loaded(self) -> dict[str, str]:
        if self._table is None:
            self._table = discover_passes(self._package)
        return self._table

    def __getitem__(self, name: str) -> str:
        return self._loaded()[name]

    def __setitem__(self, name: str, ref: str) -> None:
        self._loaded()[name] = ref

    def __delitem__(self, name: str) -> None:
        del self._loaded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    def __repr__(self) -> str:
        return f"PASSES({self._loaded()!r})"


PASSES: MutableMapping[str, str] = _PassTable(PASS_PACKAGE)
"""Pass name -> `module:Class` of the in-tree passes, derived from `slimc.passes` on first use
(importing a pass module is enough to register it)."""


def passes_with_role(role: str) -> dict[str, type[Pass]]:
    """The CLI choices of a role (`Pass.cli_role`) -> their pass classes, sorted by choice.

    A choice is the pass's name, or the `cli_choice` its class itself declares (not inherited).
    """
    found: dict[str, type[Pass]] = {}
    for name in all_pass_names():
        cls = get_pass(name)
        if cls.cli_role == role:
            found[vars(cls).get("cli_choice") or cls.name] = cls
    return dict(sorted(found.items()))


def __getattr__(attr: str) -> tuple[str, ...]:
    """`ANTI_OUTLIER` and `ROTATIONS`: the pass names of those CLI roles, found on first use."""
    roles = {"ANTI_OUTLIER": "anti-outlier", "ROTATIONS": "rotation"}
    if attr not in roles:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    return tuple(cls.name for cls in passes_with_role(roles[attr]).values())


ANALYSES: dict[str, str] = {
    "linear-groups": "slimc.analyses.linear_groups:LinearGroups",
    "activation-stats": "slimc.analyses.activation_stats:ActivationStats",
    "residual-stream": "slimc.analyses.residual_stream:ResidualStream",
    "experts": "slimc.analyses.experts:Experts",
}
"""Analysis name -> `module:Class`, for `require<name>` in pipelines."""


@dataclass(frozen=True)
class NamedPipeline:
    """A pipeline registered under a name.

    Options given to the name go to every pass of the pipeline that declares an option of that
    name (`w4a16-awq{group-size=64}` sets the group size of both `awq` and `linear-quant`).
    """

    name: str
    summary: str
    passes: tuple[PassSpec, ...]

    def expand(self, options: dict[str, OptionValue]) -> list[PassSpec]:
        """The pipeline's passes with `options` given to each pass that declares them.

        Raises:
            OptionError: an option no pass of the pipeline declares.
        """
        declared = [
            {f.name.replace("_", "-") for f in get_pass(p.name).option_fields()}
            for p in self.passes
        ]
        unused = [k for k in options if not any(k in names for names in declared)]
        if unused:
            known = sorted(set().union(*declared))
            raise OptionError(
                f"pipeline {self.name!r} has no option {unused[0]!r} (options: {', '.join(known)})"
            )
        return [
            PassSpec(p.name, {**p.options, **{k: v for k, v in options.items() if k in names}})
            for p, names in zip(self.passes, declared, strict=True)
        ]


def _quantize(scheme: str) -> tuple[PassSpec, ...]:
    return (PassSpec("linear-quant", {"scheme": (scheme,)}), PassSpec("fuse-quantized-linear"))


def _plain(scheme: str, summary: str) -> NamedPipeline:
    return NamedPipeline(scheme, summary, _quantize(scheme))


def _recipe(name: str, summary: str, smoothing: PassSpec, scheme: str) -> NamedPipeline:
    return NamedPipeline(name, summary, (smoothing, *_quantize(scheme)))


PIPELINES: dict[str, NamedPipeline] = {
    p.name: p
    for p in (
        _plain("w8a8", "int8 weights per channel x static per-tensor asymmetric int8 activations"),
        _plain("w8a8-dynamic", "int8 weights per channel x dynamic per-token int8 activations"),
        _plain("w8a16", "int8 weights (per channel or group), float activations"),
        _plain("w4a16", "int4 weights, asymmetric integer zero point, per channel or group"),
        _plain("w4a8", "int4 weights per channel x dynamic per-token int8 activations"),
        _plain("w4a4", "int4 weights per channel x dynamic per-token int4 activations"),
        _recipe(
            "w8a8-smooth-quant",
            "SmoothQuant (alpha 0.5), then w8a8",
            PassSpec("smooth-quant"),
            "w8a8",
        ),
        _recipe(
            "w8a8-iter-smooth",
            "Iterative Smooth on all group kinds, then w8a8 (static per-tensor activations)",
            PassSpec("iter-smooth"),
            "w8a8",
        ),
        _recipe(
            "w8a8-dynamic-iter-smooth",
            "Iterative Smooth on all group kinds, then w8a8-dynamic",
            PassSpec("iter-smooth"),
            "w8a8-dynamic",
        ),
        _recipe(
            "w8a8-flex-smooth",
            "Flex Smooth Quant (alpha/beta searched against per-tensor int8), then w8a8",
            PassSpec("flex-smooth-quant", {"act-quant": ("per-tensor",)}),
            "w8a8",
        ),
        _recipe(
            "w8a8-dynamic-flex-smooth",
            "Flex Smooth Quant (alpha/beta searched against per-token int8), then w8a8-dynamic",
            PassSpec("flex-smooth-quant", {"act-quant": ("per-token",)}),
            "w8a8-dynamic",
        ),
        _recipe(
            "w4a8-flex-awq-ssz",
            "Flex AWQ SSZ (alpha searched against int4 weights x per-token int8), then w4a8",
            PassSpec("flex-awq-ssz", {"act-quant": ("per-token",), "weight-bits": ("4",)}),
            "w4a8",
        ),
        NamedPipeline(
            "w4a4-quarot-gptq",
            "QuaRot (with a run-time Hadamard on down_proj inputs), then GPTQ to w4a4",
            (
                PassSpec("quarot", {"online-inputs": ("down_proj",)}),
                PassSpec("gptq", {"scheme": ("w4a4",)}),
                PassSpec("fuse-quantized-linear"),
            ),
        ),
        NamedPipeline(
            "laos",
            "LAOS: adapt-rotation + AutoRound; W8A8 dynamic on attention, down_proj and the "
            "gate/up of the 30% of decoder layers most sensitive to W4A4, W4A4 on the rest",
            (
                PassSpec("adapt-rotation", {"quant-bits": ("4",)}),
                PassSpec(
                    "autoround",
                    {
                        "scheme": ("w8a8-dynamic",),
                        "only": ("*self_attn*", "*down_proj"),
                        "sensitive-fraction": ("0.3",),
                        "sensitive-modules": ("*gate_proj", "*up_proj"),
                    },
                ),
                PassSpec("autoround", {"scheme": ("w4a4",)}),
                PassSpec("fuse-quantized-linear"),
            ),
        ),
        _recipe(
            "w4a16-awq",
            "AWQ scale search against the int4 weight quantizer, then w4a16",
            PassSpec("awq"),
            "w4a16",
        ),
    )
}
"""Named pipelines: plain schemes (no outlier suppression) and recipes that add it."""


class UnknownPassError(KeyError):
    """A pipeline names a pass or pipeline that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def _plugin_passes() -> dict[str, str]:
    """Passes of the entry-point group: `name = module:Class`, or a module or package value."""
    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        refs = {ep.name: ep.value} if ":" in ep.value else discover_passes(ep.value)
        for name, ref in refs.items():
            if name in PASSES or name in PIPELINES:
                raise RuntimeError(f"plugin pass {name!r} ({ref}) clashes with a built-in name")
            found[name] = ref
    return found


def all_pass_names() -> list[str]:
    return sorted({*PASSES, *_plugin_passes()})


def _load(ref: str) -> type:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`.

    Raises:
        UnknownPassError: no pass of that name.
    """
    ref = PASSES.get(name) or _plugin_passes().get(name)
    if ref is None:
        hint = _close(name, [*all_pass_names(), *PIPELINES])
        raise UnknownPassError(
            f"unknown pass {name!r}" + (f" (did you mean {hint!r}?)" if hint else "")
        )
    cls = _load(ref)
    if getattr(cls, "name", None) != name:
        raise RuntimeError(
            f"{ref} declares name {getattr(cls, 'name', None)!r}, registered as {name!r}"
        )
    return cls


def load_kernel_family(family: str) -> ModuleType:
    """The kernel family `family` (`cpu`, `npu`, `w4a16`, ...), imported (its ops registered).

    `family` may also name a module of a family (`cpu.onednn`); lowering passes bind their
    kernels through this function, never by importing the kernel package themselves.

    Raises:
        ImportError: the family, or an optional dependency of it, is not installed.
    """
    return importlib.import_module(f"{KERNEL_PACKAGE}.{family}")


def load_kernel_families() -> list[str]:
    """Import every kernel family that can be (so a lowered program's kernel ops resolve).

    Returns the families that imported; none when the kernels are not installed.
    """
    try:
        kernels = importlib.import_module(KERNEL_PACKAGE)
    except ImportError:  # pragma: no cover - kernels are an optional part of the install
        log.debug("%s not importable; the reference ops only", KERNEL_PACKAGE)
        return []
    return kernels.import_families()


def get_analysis(name: str) -> type:
    ref = ANALYSES.get(name)
    if ref is None:
        known = ", ".join(sorted(ANALYSES)) or "none"
        raise UnknownPassError(f"unknown analysis {name!r} (known: {known})")
    return _load(ref)


def _close(name: str, candidates: list[str]) -> str | None:
    match = difflib.get_close_matches(name, candidates, n=1)
    return match[0] if match else None
