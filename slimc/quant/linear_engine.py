"""The calibrate-and-rewrite engine of linear quantization, with a weight-method hook.

`LinearQuantEngine` holds what every linear quantizer shares: the options (scheme, group size,
linears chosen by glob or by sensitivity), the layer-by-layer calibration of static activation
ranges, and the rewrite of each chosen linear to the QDQ form. How a weight is rounded is a
`WeightMethod` strategy the concrete pass gives it: round to nearest (MinMax), GPTQ, SSZ and
AutoRound plug in there, so each algorithm is a leaf pass on this engine.
"""

from __future__ import annotations

import abc
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from slimc.analysis import AnalysisManager
from slimc.errors import UserError
from slimc.ir.builder import tensor_val
from slimc.linear_select import (
    EXPERT_LINEAR,
    float_linears,
    float_products,
    matches,
    moe_gates,
    product_path,
)
from slimc.pass_base import GROUP_SIZE, OptionError, Pass, PassResult, option
from slimc.pipeline_spec import OptionValue
from slimc.program import SCHEME_KEY, Program, layer_of, node_loc
from slimc.quant.all_experts import plan_all_experts
from slimc.quant.expert_inputs import ExpertInputs, round_expert_stack
from slimc.quant.observers import HistogramObserver, MinMaxObserver
from slimc.quant.qdq_rewrite import dequantized_weight, quantized_input
from slimc.quant.qparams import QuantizedWeight
from slimc.quant.replay import linear_key, open_journal, recorded_results, replayed_results
from slimc.quant.scheme import (
    SCHEMES,
    LinearQuantScheme,
    QuantTarget,
    SchemeName,
    TensorQuantSpec,
    make_scheme,
)
from slimc.quant.sensitivity import describe, most_sensitive, rank_layers
from slimc.quant.weight_method import Replay, WeightMethod
from slimc.runner import LayerwiseRunner, Segment
from slimc.stage import Stage
from slimc.weight_spill import spill_constants_of

log = logging.getLogger(__name__)
SCHEME_HELP = f"Quantization scheme: {', '.join(SCHEMES)}."


@dataclass(frozen=True, kw_only=True)
class LinearQuantEngine(Pass):
    """Base of the linear quantizers: shared options, calibration and the QDQ rewrite.

    Not a pass itself (it declares no `name`): a pass subclasses it, names itself and returns
    its weight method from `weight_method`.
    """

    accepts = frozenset({Stage.ATEN, Stage.QDQ})
    produces = Stage.QDQ
    exact = False

    scheme: SchemeName = option("w8a8-dynamic", SCHEME_HELP)
    group_size: int = option(
        -1, "Weight group size along K; -1 = per output channel.", check=GROUP_SIZE
    )
    symmetric: bool | None = option(None, "Symmetric weights (default: the scheme's own).")
    observer: Literal["minmax", "histogram"] = option(
        "histogram",
        "Observer for static activation ranges: histogram (L2 clip search) or minmax.",
    )
    ignore: tuple[str, ...] = option(("lm_head",), "Module-path globs left in float.")
    only: tuple[str, ...] = option((), "If set, quantize only module paths matching these globs.")
    on_bad_group: Literal["fallback", "error"] = option(
        "fallback", "When group-size does not divide a layer's K: per-channel for it, or refuse."
    )
    sensitive_fraction: float = option(
        0.0,
        "Also quantize (beyond `only`) the linears matching `sensitive-modules` in this "
        "fraction of decoder layers, those whose outputs move most when those linears are "
        "quantized to `sensitive-probe` (layer-output MSE on the calibration data); 0 = off.",
    )
    sensitive_modules: tuple[str, ...] = option(
        ("*mlp*",), "The linears of each decoder layer that the sensitivity ranking probes."
    )
    sensitive_probe: SchemeName = option(
        "w4a4", "Scheme (round to nearest) the sensitivity ranking quantizes with."
    )
    calibrate_all_experts: bool = option(
        False,
        "MoE: give every expert every calibration token for its static ranges and GPTQ / SSZ "
        "inputs, not only the tokens routed to it (the forward keeps its routing).",
    )

    @abc.abstractmethod
    def weight_method(self) -> WeightMethod:
        """The strategy that rounds this pass's weights, built from its options."""

    @classmethod
    def for_scheme(cls, target: QuantTarget) -> dict[str, OptionValue]:
        """Quantize to the scheme, with the requested group size and symmetry."""
        opts: dict[str, OptionValue] = {"scheme": (target.scheme_name,)}
        if target.group_size is not None:
            opts["group-size"] = (str(target.group_size),)
        if target.symmetric:
            opts["symmetric"] = ("true",)
        return opts

    def __post_init__(self) -> None:
        try:
            make_scheme(self.scheme, group_size=self.group_size, symmetric=self.symmetric)
        except ValueError as exc:
            raise OptionError(f"pass {self.name!r}: {exc}") from None
        if not 0.0 <= self.sensitive_fraction <= 1.0:
            raise OptionError(
                f"pass {self.name!r}: sensitive-fraction must be in [0, 1], "
                f"got {self.sensitive_fraction}"
            )

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.sensitive_fraction > 0 or self.observes_inputs(self.weight_method())

    @property
    def calibrates_across_ranks(self) -> bool:  # type: ignore[override]
        """Static ranges and input collectors are all-reduced; the sensitivity ranking and a
        method with its own loop (AutoRound) are not."""
        return self.sensitive_fraction == 0 and self.weight_method().calibrates_across_ranks

    def observes_inputs(self, method: WeightMethod) -> bool:
        """Whether the rewrite runs calibration data: static activations, or a method reading inputs."""
        act = self.quant_scheme().activation
        return method.reads_inputs or (act is not None and not act.dynamic)

    def quant_scheme(self) -> LinearQuantScheme:
        """The scheme the options describe (validated when the pass was built)."""
        return make_scheme(self.scheme, group_size=self.group_size, symmetric=self.symmetric)

    def targets(self, program: Program) -> list[fx.Node]:
        """The float linears and MoE expert products this pass quantizes: `only` (plus sensitive
        layers) minus `ignore` and MoE routers; expert products are matched by their stacked
        weight's name (`*.experts.down_proj`)."""
        sensitive = self._sensitive_linears(program) if self.only else set()
        routers = moe_gates(program)  # float: their rounding would change which experts run
        if routers:
            log.info("%s: leaving %d MoE routers and gates in float", self.name, len(routers))
        keep_experts_float = self.weight_method().experts == "float"
        chosen, left_float = [], []
        for node in float_products(program):
            path = product_path(node)
            if self.only and not matches(path, self.only) and node not in sensitive:
                continue
            if matches(path, self.ignore) or node in routers:
                continue
            if node.target is EXPERT_LINEAR and keep_experts_float:
                left_float.append(path)
                continue
            chosen.append(node)
        if left_float:
            log.warning(
                "%s: leaving %d MoE expert stacks in float (%s, ...): this method does not "
                "round experts yet (gptq and rtn do)",
                self.name,
                len(left_float),
                left_float[0],
            )
            self.stat(program, "expert stacks left in float", len(left_float))
        return chosen

    def _sensitive_linears(self, program: Program) -> set[fx.Node]:
        """The `sensitive-modules` linears of the most sensitive decoder layers (see options)."""
        if self.sensitive_fraction <= 0:
            return set()
        probed = [n for n in float_linears(program) if matches(node_loc(n), self.sensitive_modules)]
        ranked = rank_layers(
            program,
            make_scheme(self.sensitive_probe),
            probed,
            program.require_calibration(self.name),
        )
        top = most_sensitive(ranked, self.sensitive_fraction)
        log.info(
            "%s: sensitivity ranking (%s): %s", self.name, self.sensitive_probe, describe(ranked)
        )
        log.info("%s: adding the linears of %d sensitive layers", self.name, len(top))
        self.stat(program, "sensitive decoder layers added", len(top))
        paths = {path for score in top for path in score.linears}
        return {n for n in probed if node_loc(n) in paths}

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        scheme = self.quant_scheme()
        targets = self.targets(program)
        if not targets:
            self._nothing_to_quantize(program, scheme)
            return PassResult(changed=False)
        method = self.weight_method()
        if self.observes_inputs(method):
            method.calibrate_and_rewrite(self, program, targets, scheme)
        else:
            for _, run in itertools.groupby(targets, lambda n: layer_of(node_loc(n))):
                layer = list(run)
                for node in layer:
                    self.rewrite(program, node, scheme, None, method=method)
                # the layer's codes and scales (its weights' dequantizations read them): to files
                spill_constants_of(program, [n.args[1] for n in layer])  # type: ignore[misc]
        program.recompile()
        return PassResult(changed=True)

    def _nothing_to_quantize(self, program: Program, scheme: LinearQuantScheme) -> None:
        """Say why no linear was chosen: an error unless earlier passes quantized them all.

        Raises:
            UserError: the graph has no float linear, or `only` / `ignore` exclude every one.
        """
        remaining = float_products(program)
        quantized = any(SCHEME_KEY in n.meta for n in program.graph.nodes)
        if not remaining and quantized:
            log.info("%s: every linear is already quantized", self.name)
            return
        what = f"{self.name}{{scheme={scheme.name}}} quantized no linear"
        if not remaining:
            raise UserError(f"{what}: the graph has no aten.linear with a constant weight")
        filters = f"ignore={','.join(self.ignore)}"
        if self.only:
            filters = f"only={','.join(self.only)} and {filters}"
        raise UserError(f"{what}: all {len(remaining)} linears are excluded by {filters}")

    # -- static activations and input collectors: layer by layer ---------------------------
    def observe_and_rewrite(
        self,
        program: Program,
        targets: list[fx.Node],
        scheme: LinearQuantScheme,
        method: WeightMethod,
    ) -> None:
        """Observe each layer's linear inputs on calibration data, then rewrite its linears.

        Each layer sees the already-quantized outputs of the layers before it.

        Raises:
            UserError: a calibration input the observers or collectors refuse (NaN, inf).
        """
        samples = program.require_calibration(self.name)
        wanted = set(targets)
        act = scheme.activation
        static = act is not None and not act.dynamic
        journal = open_journal(program, self.name, wanted)
        experts = [n for n in targets if n.target is EXPERT_LINEAR]
        feeds = plan_all_experts(program, experts) if self.calibrate_all_experts else []
        fed = {p: feed for feed in feeds for p in feed.products}  # observed through the feed

        def visit(seg: Segment, runner: LayerwiseRunner) -> None:
            here = [n for n in seg.nodes if n in wanted]
            if not here:
                return
            recorded = journal.finished(seg.label) if journal is not None else None
            if recorded is not None:  # finished by a run that was stopped: replayed
                for node in here:
                    qparams, qw = replayed_results(recorded, node, static)
                    self.rewrite(program, node, scheme, qparams, method=Replay(qw))
                return
            results: dict[str, torch.Tensor] = {}
            observers: dict[fx.Node, Any] = {}
            collectors: dict[fx.Node, Any] = {}
            first_reader: dict[Any, fx.Node] = {}  # hooked: q, k and v read one value once
            for node in here:
                x = node.args[0]
                first_reader.setdefault(x, node)
                if static and x not in observers:
                    observers[x] = self.make_observer(act)  # type: ignore[arg-type]
                if method.reads_inputs and x not in collectors:
                    collectors[x] = self.input_collector(node, scheme, method)

            def observe(node: fx.Node, x_rows: torch.Tensor, ids: torch.Tensor | None) -> None:
                x = node.args[0]
                try:
                    if (observer := observers.get(x)) is not None:
                        observer.update(x_rows)
                    if isinstance(collector := collectors.get(x), ExpertInputs):
                        collector.update(x_rows, ids)  # each expert its rows
                    elif collector is not None:
                        collector.update(x_rows)
                except ValueError as exc:
                    raise UserError(f"{self.name}: input of {product_path(node)}: {exc}") from None

            def hook(node: fx.Node, args: tuple[Any, ...]) -> None:
                feed = fed.get(node)
                if feed is None:
                    observe(node, args[0], args[2] if node.target is EXPERT_LINEAR else None)
                elif node is feed.trigger:  # the block's products, each reading every token
                    feed.feed(args[0], program, observe_first)

            def observe_first(node: fx.Node, x_rows: torch.Tensor, ids: torch.Tensor) -> None:
                if first_reader.get(node.args[0]) is node:  # gate and up share one input
                    observe(node, x_rows, ids)

            hooks = dict.fromkeys(first_reader.values(), hook)
            hooks.update((f.trigger, hook) for f in feeds if f.trigger in seg.nodes)
            runner.forward(seg.nodes, hooks)
            for gathered in (*observers.values(), *collectors.values()):
                if gathered is not None:
                    gathered.all_reduce()  # over the calibration ranks (slimc.distributed)
            last_reader = {node.args[0]: node for node in here}
            for node in here:
                x, key = node.args[0], linear_key(node)  # the key: before the rewrite
                qparams = observers[x].calculate_qparams() if static else None
                qw = self.rewrite(program, node, scheme, qparams, collectors.get(x), method=method)
                results.update(recorded_results(key, qparams, qw))
                if last_reader[x] is node:  # its Hessian (and factorization) no longer needed
                    collectors.pop(x, None)
            if journal is not None:
                journal.record(seg.label, results)

        LayerwiseRunner(program, samples).run(visit)

    def input_collector(
        self, node: fx.Node, scheme: LinearQuantScheme, method: WeightMethod
    ) -> Any:
        """`method`'s collector of a linear's inputs; per expert for an expert product."""
        k = tensor_val(node.args[0]).shape[-1]  # type: ignore[arg-type]
        if node.target is EXPERT_LINEAR:
            experts = tensor_val(node.args[1]).shape[0]  # type: ignore[arg-type]
            return ExpertInputs(experts, lambda: method.input_collector(scheme, k))
        return method.input_collector(scheme, k)

    def make_observer(self, act: TensorQuantSpec) -> Any:
        """The static-range observer the `observer` option names, for activation spec `act`."""
        if self.observer == "histogram":
            return HistogramObserver(act)
        return MinMaxObserver(act)

    # -- graph rewrite ---------------------------------------------------------------------
    def weight_scheme(
        self, program: Program, scheme: LinearQuantScheme, k: int, path: str
    ) -> LinearQuantScheme:
        """`scheme` for a linear of input width `k`: per channel where the group size does not
        divide `k` (`on-bad-group=fallback`, counted in the statistics).

        Raises:
            UserError: the group size does not divide `k` and `on-bad-group=error`.
        """
        spec = scheme.weight
        if spec.granularity == "group" and k % spec.group_size:
            msg = f"group size {spec.group_size} does not divide K={k} of {path}"
            if self.on_bad_group == "error":
                raise UserError(f"{self.name}: {msg} (on-bad-group=error)")
            log.info("%s: %s; quantizing it per channel", self.name, msg)
            self.stat(program, "group-size fallbacks to per-channel")
            return scheme.with_weight(granularity="channel", group_size=-1)
        return scheme

    def rewrite(
        self,
        program: Program,
        node: fx.Node,
        scheme: LinearQuantScheme,
        static_qparams: tuple[torch.Tensor, torch.Tensor] | None,
        collected: Any = None,
        *,
        method: WeightMethod,
    ) -> QuantizedWeight:
        """Rewrite one linear to the QDQ form: its weight rounded by `method`, its input
        quantized as `scheme`'s activations say (`static_qparams` for static ranges).
        Returns the rounded weight.

        Raises:
            UserError: the weight holds NaN or inf.
        """
        x, w_node = node.args[0], node.args[1]
        assert isinstance(x, fx.Node) and isinstance(w_node, fx.Node)
        path = product_path(node) or node.name
        weight = program.weights.get(str(w_node.target))
        if not bool(torch.isfinite(weight).all()):
            raise UserError(f"{self.name}: weight {w_node.target} holds NaN or inf")
        scheme = self.weight_scheme(program, scheme, weight.shape[-1], path)
        spec = scheme.weight
        if weight.dim() == 3:  # an expert stack [E, N, K]
            qw = round_expert_stack(self, program, node, weight, spec, collected, method)
        else:
            qw = method.quantize_linear_weight(self, program, node, weight, spec, collected)
        origin = str(self)
        # constants are named under the linear's module; an expert stack's under `<stack>_quant`
        prefix = f"{path}_quant" if weight.dim() == 3 else path
        w_dq = dequantized_weight(program, node, qw, spec, weight, prefix, origin)
        new_x = x
        act = scheme.activation
        if act is not None:
            new_x = quantized_input(program, node, x, act, static_qparams, prefix, origin)
        node.args = (new_x, w_dq, *node.args[2:])
        node.meta[SCHEME_KEY] = scheme
        what = "expert stacks" if weight.dim() == 3 else "linears"
        self.stat(program, f"quantized {what} ({scheme.name})")
        return qw
