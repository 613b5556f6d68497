"""The `slimc` torch.compile backend: lowers already-quantized Dynamo graphs to kernels.

`torch.compile(model, backend="slimc")` finds `slimc_backend` through the `torch_dynamo_backends`
entry point. Each graph Dynamo hands over is exported with its weights as constants, brought to
the canonical form `slimc.capture` gives, and lowered by a pipeline (default: `lower-cpu` for
CPU inputs, `lower-triton` for CUDA). Passes that change float weights are refused: quantize with
`slimc.compile` first.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import fx

from slimc import registry
from slimc.dynamo_capture import has_slimc_ops, program_from_dynamo, slimc_op_name
from slimc.errors import PipelineError, UserError, first_line
from slimc.ir.builder import is_constant
from slimc.ir.printer import print_program
from slimc.ops.fused import bound_args, fused_linear_kind
from slimc.pass_manager import PassManager, build_step, expand
from slimc.pipeline_spec import PassSpec, PipelineSyntaxError, parse_pipeline
from slimc.program import SCHEME_KEY, Program
from slimc.quant.scheme import Granularity, LinearQuantScheme, TensorQuantSpec, make_scheme
from slimc.stage import Stage

log = logging.getLogger(__name__)

__all__ = [
    "BackendOptions",
    "CompiledGraph",
    "annotate_schemes",
    "infer_scheme",
    "resolve_pipeline",
    "slimc_backend",
]


def lowering_passes() -> frozenset[str]:
    """The registered lowering passes (`cli_role` "lowering", plugins included): skipped with a
    warning (not an error) when not available."""
    return frozenset(cls.name for cls in registry.passes_with_role("lowering").values())


def default_lowerings() -> dict[str, str]:
    """Device type of the example inputs -> the lowering pass run when no pipeline is given
    (the lowering passes' `device_type`)."""
    found: dict[str, str] = {}
    for cls in registry.passes_with_role("lowering").values():
        device = getattr(cls, "device_type", None)
        if device is not None:
            if device in found:
                raise RuntimeError(
                    f"lowering passes {found[device]!r} and {cls.name!r} both declare "
                    f"device_type {device!r}"
                )
            found[device] = cls.name
    return found


@dataclass(frozen=True)
class BackendOptions:
    """Options of the backend: `torch.compile(m, backend="slimc", options={...})`.

    Attributes:
        pipeline: passes to run after canonicalize (default: the device's lowering pass; `""`
            runs none). Passes that change float weights are refused.
        dump_ir: a file to write the IR before and after lowering to (one section pair per
            compiled graph; the file is rewritten the first time this process uses it).
        fallback: when a graph cannot be exported or a pass fails, log a warning and run the
            graph as Dynamo gave it instead of raising.
        float_backend: another torch.compile backend (e.g. "inductor") for graphs without
            slimc ops; by default they run as they are.
    """

    pipeline: str | None = None
    dump_ir: str | None = None
    fallback: bool = True
    float_backend: str | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> BackendOptions:
        """Check option names and types.

        Raises:
            UserError: an unknown option or a value of the wrong type.
        """
        known = {f.name: f for f in fields(cls)}
        for key, value in options.items():
            if key not in known:
                raise UserError(
                    f"the slimc backend has no option {key!r} (options: {', '.join(known)})"
                )
            want = bool if key == "fallback" else (str, Path)
            if value is not None and not isinstance(value, want):
                raise UserError(f"slimc backend option {key!r} got {value!r}")
        return cls(**{k: str(v) if isinstance(v, Path) else v for k, v in options.items()})


# -- the pipeline ------------------------------------------------------------------------------
def _changes_weights(cls: type) -> bool:
    """A pass that runs on float (aten) graphs rewrites weights; stage-generic passes do not."""
    accepts = getattr(cls, "accepts", frozenset())
    return Stage.ATEN in accepts and accepts != frozenset(Stage)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Warn about a missing lowering once per process (not once per compiled graph)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)
    else:
        log.debug(message)


def _available(name: str) -> bool:
    """Whether pass `name` is registered and its module imports (e.g. triton is installed)."""
    if name not in registry.all_pass_names():
        return False
    try:
        registry.get_pass(name)
    except Exception as exc:  # an optional dependency of the pass is missing
        _warn_once(f"slimc backend: pass {name!r} cannot be loaded: {first_line(exc)}")
        return False
    return True


def resolve_pipeline(text: str) -> list[PassSpec]:
    """Parse a backend pipeline, refuse weight-changing passes, drop unavailable lowerings.

    Raises:
        PipelineError: a syntax error or an unknown pass.
        UserError: a pass that changes weights (quantizers, smoothing, rotations).
    """
    try:
        specs = parse_pipeline(text)
    except PipelineSyntaxError as exc:
        raise PipelineError(f"bad pipeline: {exc}") from None
    out: list[PassSpec] = []
    lowering = lowering_passes()
    for spec in specs:
        via = f" (from pipeline {spec.name!r})" if spec.name in registry.PIPELINES else ""
        for item in expand([spec]):
            if item.analysis is None:
                if item.name in lowering and not _available(item.name):
                    _warn_once(
                        f"slimc backend: lowering pass {item.name!r} is not available; skipped"
                    )
                    continue
                _refuse_weight_changes(item.name, via)
            out.append(item)
    return out


def _refuse_weight_changes(name: str, via: str) -> None:
    try:
        cls = registry.get_pass(name)
    except registry.UnknownPassError as exc:
        raise PipelineError(str(exc)) from None
    if _changes_weights(cls):
        raise UserError(
            f"the slimc torch.compile backend refuses pass {name!r}{via}: it changes the model's "
            "weights. Quantize with slimc.compile(model, ...) first, then torch.compile the "
            "returned model with backend='slimc'"
        )


def _default_pipeline(stage: Stage, device: str) -> list[PassSpec]:
    specs = [PassSpec("fuse-quantized-linear")] if stage == Stage.QDQ else []
    lowering = default_lowerings().get(device)
    if lowering is None:
        _warn_once(f"slimc backend: no lowering pass for {device} inputs; graph left unlowered")
    elif not _available(lowering):
        _warn_once(
            f"slimc backend: lowering pass {lowering!r} is not available; graph left unlowered"
        )
    else:
        specs.append(PassSpec(lowering))
    return specs


def _device(example_inputs: Sequence[Any]) -> str:
    types = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    others = sorted(types - {"cpu", "meta"})
    return others[0] if others else "cpu"


# -- schemes, read back from the ops' arguments --------------------------------------------------
def annotate_schemes(program: Program) -> int:
    """Set `meta[SCHEME_KEY]` on quantized linears that lack it (lowering passes read it)."""
    count = 0
    for node in program.graph.nodes:
        if SCHEME_KEY in node.meta or node.op != "call_function":
            continue
        scheme = infer_scheme(node)
        if scheme is not None:
            node.meta[SCHEME_KEY] = scheme
            count += 1
    return count


def _producer(value: Any, name: str) -> fx.Node | None:
    """The `slimc::name` node `value` is (or is element `getitem` of), else None."""
    if isinstance(value, fx.Node) and value.target is operator.getitem:
        value = value.args[0]
    return value if isinstance(value, fx.Node) and slimc_op_name(value) == name else None


def _granularity(block: Sequence[int], last_dim: int | None) -> tuple[Granularity, int]:
    if all(b == -1 for b in block):
        return "tensor", -1
    if block[-1] in (-1, last_dim):
        return "channel", -1
    return "group", int(block[-1])


def _activation(q: fx.Node) -> TensorQuantSpec:
    """The spec of a `quantize_per_token` or `quantize_affine` activation quantization."""
    args = bound_args(q)
    if slimc_op_name(q) == "quantize_per_token":
        qmax = int(args["qmax"])
        return TensorQuantSpec(4 if qmax <= 7 else 8, True, "token", dynamic=True)
    chosen = _producer(args["scale"], "choose_qparams_affine")
    gran, _ = _granularity(list(args["block_size"]), None)
    bits = 4 if int(args["qmin"]) >= -8 else 8
    if chosen is not None:
        symmetric = bool(bound_args(chosen)["symmetric"])
        return TensorQuantSpec(bits, symmetric, "token", dynamic=True)
    symmetric = args["zero_point"] is None
    return TensorQuantSpec(bits, symmetric, "tensor" if gran == "tensor" else "token")


def _named(weight: TensorQuantSpec, act: TensorQuantSpec | None) -> LinearQuantScheme:
    """Name the scheme after the plain scheme it equals (`w8a8-dynamic`), else `wXaY`."""
    abits = 16 if act is None else act.bits
    base = f"w{weight.bits}a{abits}"
    for name in (base, f"{base}-dynamic"):
        try:
            plain = make_scheme(
                name,
                group_size=weight.group_size,
                symmetric=weight.symmetric if act is None else None,
            )
        except ValueError:
            continue
        if plain.weight == weight and plain.activation == act:
            return plain
    return LinearQuantScheme(base, weight, act)


def infer_scheme(node: fx.Node) -> LinearQuantScheme | None:
    """The scheme a fused `slimc.linear_*` or a QDQ `aten.linear` computes, from its arguments."""
    fused = fused_linear_kind(node)
    if fused is not None and not fused.quantized_input:
        args = fused.read(node)
        group = int(args.group_size)
        weight = TensorQuantSpec(
            fused.weight_bits,
            args.weight_zero_point is None,
            "group" if group > 0 else "channel",
            group if group > 0 else -1,
        )
        return _named(weight, None)
    if fused is not None:
        weight = TensorQuantSpec(fused.weight_bits, True, "channel")
        x = fused.read(node).input
        q = _producer(x, "quantize_per_token") or _producer(x, "quantize_affine")
        return None if q is None else _named(weight, _activation(q))
    if node.target is torch.ops.aten.linear.default:
        return _qdq_scheme(node)
    return None


def _qdq_scheme(node: fx.Node) -> LinearQuantScheme | None:
    linear = bound_args(node)
    w = _producer(linear["weight"], "dequantize_affine")
    dq = None if w is None else bound_args(w)
    if dq is None or not is_constant(dq["q"]):
        return None
    k = dq["q"].meta["val"].shape[-1]
    gran, group = _granularity(list(dq["block_size"]), int(k))
    bits = 4 if int(dq["qmin"]) >= -8 else 8
    weight = TensorQuantSpec(bits, dq["zero_point"] is None, gran, group)
    x = _producer(linear["input"], "dequantize_affine")
    q = None if x is None else _producer(bound_args(x)["q"], "quantize_affine")
    return _named(weight, None if q is None else _activation(q))


# -- what the backend returns -------------------------------------------------------------------
class CompiledGraph:
    """Runs a lowered program on the graph inputs Dynamo passes (weights are constants in it)."""

    def __init__(self, program: Program, positions: Sequence[int]) -> None:
        self.program = program
        self.positions = list(positions)

    def __call__(self, *args: Any) -> Any:
        return self.program.graph_module(*(args[i] for i in self.positions))


_DUMPED: set[str] = set()


def _dump(path: str, title: str, before: str, after: str, pipeline: str) -> None:
    mode = "a" if path in _DUMPED else "w"
    _DUMPED.add(path)
    with open(path, mode, encoding="utf-8") as f:
        f.write(f"// -----// slimc backend: IR Before lowering ({title}) //----- //\n{before}\n")
        f.write(f"// -----// slimc backend: IR After {pipeline} ({title}) //----- //\n{after}\n")


def _float_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions
) -> Callable[..., Any]:
    if opts.float_backend is None:
        return gm.forward
    # torch.compile loads Dynamo; importing slimc.backend does not
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(opts.float_backend)(gm, list(example_inputs))


def slimc_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """Compile one Dynamo graph: capture it as a Program, canonicalize, lower, return a callable.

    Graphs without `slimc` ops (the float parts around a graph break) run unchanged, or through
    `float_backend`. Options come from `torch.compile(..., options={...})` or as keywords; see
    `BackendOptions`.

    Raises:
        UserError: an unknown option, a bad pipeline, or a pass that changes weights.
    """
    opts = BackendOptions.parse({**(options or {}), **kwargs})
    explicit = None if opts.pipeline is None else resolve_pipeline(opts.pipeline)
    if not has_slimc_ops(gm.graph):
        log.info(
            "slimc backend: graph without slimc ops %s",
            f"handed to {opts.float_backend!r}" if opts.float_backend else "runs as is",
        )
        return _float_graph(gm, example_inputs, opts)
    try:
        program, positions = program_from_dynamo(gm, example_inputs)
    except Exception as exc:
        if not opts.fallback:
            raise
        log.warning(
            "slimc backend: cannot capture the graph (%s); running it as is", first_line(exc)
        )
        return gm.forward
    annotate_schemes(program)
    title = str(gm.meta.get("dynamo_compile_id", "graph"))
    before = print_program(program) if opts.dump_ir else ""
    if program.stage in (Stage.ATEN, Stage.KERNEL):
        specs: list[PassSpec] = []  # nothing quantized to lower, or already lowered
    elif explicit is not None:
        specs = explicit
    else:
        specs = _default_pipeline(program.stage, _device(example_inputs))
    pm = PassManager([build_step(s) for s in specs], start_stage=program.stage)
    spec_text = pm.pipeline_spec() or "no lowering"
    try:
        with torch._guards.tracing(None):  # passes must not see Dynamo's fake mode
            pm.run(program)
    except Exception as exc:
        if not opts.fallback or isinstance(exc, UserError):
            raise
        log.warning("slimc backend: %s failed (%s); running the graph as is", spec_text, exc)
        if opts.dump_ir:
            _dump(opts.dump_ir, title, before, f"// failed: {first_line(exc)}", spec_text)
        return gm.forward
    log.info(
        "slimc backend: graph %s at the %s stage after %s", title, program.stage.label, spec_text
    )
    if opts.dump_ir:
        _dump(opts.dump_ir, title, before, print_program(program), spec_text)
    return CompiledGraph(program, positions)
