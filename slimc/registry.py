"""The one registry of passes, named pipelines and analyses, loaded lazily by name."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from slimc.pipeline_spec import OptionValue, PassSpec

if TYPE_CHECKING:
    from slimc.pass_base import Pass

log = logging.getLogger(__name__)

PASSES: dict[str, str] = {
    "canonicalize": "slimc.passes.canonicalize:Canonicalize",
    "linear-quant": "slimc.passes.linear_quant:LinearQuant",
    "fuse-quantized-linear": "slimc.passes.fuse_quantized_linear:FuseQuantizedLinear",
    "gptq": "slimc.passes.gptq:GPTQ",
    "ssz": "slimc.passes.ssz:SSZ",
    "autoround": "slimc.passes.autoround:AutoRound",
    "smooth-quant": "slimc.passes.smooth_quant:SmoothQuant",
    "iter-smooth": "slimc.passes.iter_smooth:IterSmooth",
    "awq": "slimc.passes.awq:AWQ",
    "flex-smooth-quant": "slimc.passes.flex_smooth_quant:FlexSmoothQuant",
    "flex-awq-ssz": "slimc.passes.flex_awq_ssz:FlexAWQSSZ",
    "quarot": "slimc.passes.quarot:QuaRot",
    "adapt-rotation": "slimc.passes.adapt_rotation:AdaptRotation",
    "float-sparse": "slimc.passes.float_sparse:FloatSparse",
    "lower-npu": "slimc.passes.lower_npu:LowerNPU",
    "lower-cpu": "slimc.passes.lower_cpu:LowerCPU",
    "lower-triton": "slimc.passes.lower_triton:LowerTriton",
}
"""Pass name -> `module:Class`. The single source of truth for in-tree passes."""

ANTI_OUTLIER: tuple[str, ...] = (
    "smooth-quant",
    "iter-smooth",
    "flex-smooth-quant",
    "awq",
    "flex-awq-ssz",
)
"""Smoothing passes `slimc quant --anti-outlier` accepts (each also usable in any pipeline)."""

ROTATIONS: tuple[str, ...] = ("quarot", "adapt-rotation")
"""Rotation passes `slimc quant --rotation` accepts (run first, before smoothing)."""

WEIGHT_METHODS: dict[str, str] = {
    "rtn": "linear-quant",
    "gptq": "gptq",
    "ssz": "ssz",
    "autoround": "autoround",
}
"""`slimc quant --weight-method` choice -> the quantizer pass it runs (rtn: MinMax rounding)."""

ANALYSES: dict[str, str] = {
    "linear-groups": "slimc.analyses.linear_groups:LinearGroups",
    "activation-stats": "slimc.analyses.activation_stats:ActivationStats",
    "residual-stream": "slimc.analyses.residual_stream:ResidualStream",
}
"""Analysis name -> `module:Class`, for `require<name>` in pipelines."""

ENTRY_POINT_GROUP = "slimc.passes"


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
        from slimc.pass_base import OptionError

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
    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in PASSES or ep.name in PIPELINES:
            raise RuntimeError(f"plugin pass {ep.name!r} ({ep.value}) clashes with a built-in name")
        found[ep.name] = ep.value
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


def get_analysis(name: str) -> type:
    ref = ANALYSES.get(name)
    if ref is None:
        known = ", ".join(sorted(ANALYSES)) or "none"
        raise UnknownPassError(f"unknown analysis {name!r} (known: {known})")
    return _load(ref)


def _close(name: str, candidates: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, candidates, n=1)
    return match[0] if match else None
