"""autoround: linear-quant whose weight rounding and ranges are learned per decoder layer."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, fx

from slimc.calibration import pack_token_samples
from slimc.errors import UserError
from slimc.pass_base import OptionError, option
from slimc.program import Program, node_loc
from slimc.quant.autoround import RoundingParams, TuneConfig, quantize_rounded, tune_block
from slimc.quant.layer_run import (
    ActQuant,
    Env,
    act_fake_quant,
    float_references,
    output_loss,
    run_region,
    upstream,
)
from slimc.quant.linear_engine import SCHEME_HELP, LinearQuantEngine
from slimc.quant.qparams import QuantizedWeight, quantize_weight
from slimc.quant.replay import (
    linear_key,
    open_journal,
    recorded_results,
    recorded_tensor,
    replayed_results,
)
from slimc.quant.scheme import LinearQuantScheme, SchemeName, TensorQuantSpec
from slimc.quant.weight_method import Replay, WeightMethod
from slimc.runner import LayerwiseRunner, Segment
from slimc.smooth.region import Recorder, Region, RegionError, merge_hooks
from slimc.work_dir import LayerJournal

log = logging.getLogger(__name__)
slimc_ops = torch.ops.slimc


def _to(value: Any, device: str) -> Any:
    """A normal (non-inference) tensor on `device`; other values unchanged."""
    if isinstance(value, Tensor):
        return value.detach().to(device).clone()
    return value


@dataclass(frozen=True)
class LayerTuning(WeightMethod):
    """AutoRound's weight method: rounding and ranges trained per decoder layer, then written.

    Attributes:
        tune: the SignSGD settings of every layer.
        seqlen: tokens per training sample (token-id samples are packed); 0 = as given.
        samples: train on at most this many (packed) samples; 0 = all.
        device: device each layer is trained on.
        amp: train under bfloat16 autocast.
    """

    tune: TuneConfig
    seqlen: int
    samples: int
    device: str
    amp: bool
    reads_inputs: ClassVar[bool] = True
    experts: ClassVar[str] = "float"  # its loop tunes linears; expert stacks are not tuned yet
    calibrates_across_ranks: ClassVar[bool] = False  # its training loop runs on one rank's data

    def training_samples(self, program: Program, name: str) -> list[tuple[Any, ...]]:
        """The calibration samples, packed to `seqlen` tokens when they are token ids."""
        calib = list(program.require_calibration(name))
        if self.seqlen:
            try:
                packed = pack_token_samples(calib, self.seqlen)
            except ValueError as exc:
                log.info("%s: %s; training on the samples as given", name, exc)
            else:
                tokens = sum(int(s[0].numel()) for s in packed)
                log.info(
                    "%s: packed %d calibration samples (%d tokens) into %d of <= %d tokens",
                    name,
                    len(calib),
                    tokens,
                    len(packed),
                    self.seqlen,
                )
                calib = list(packed)
        return calib[: self.samples] if self.samples else calib

    def quantize_linear_weight(
        self,
        quant: LinearQuantEngine,
        program: Program,
        node: fx.Node,
        weight: Tensor,
        spec: TensorQuantSpec,
        collected: Any,
    ) -> QuantizedWeight:
        if collected is None:  # the layer was not tuned: plain rounding
            return quantize_weight(weight, spec)
        assert isinstance(collected, RoundingParams)
        return quantize_rounded(weight, spec, collected)

    def calibrate_and_rewrite(
        self,
        quant: LinearQuantEngine,
        program: Program,
        targets: list[fx.Node],
        scheme: LinearQuantScheme,
    ) -> None:
        """Tune and rewrite the chosen linears decoder layer by decoder layer.

        Raises:
            UserError: no device of the `device` kind is available.
        """
        kind = torch.device(self.device).type
        backend = getattr(torch, kind, None)
        if kind != "cpu" and not (backend is not None and backend.is_available()):
            raise UserError(f"{quant.name}: device={self.device} but no {kind} device is available")
        samples = self.training_samples(program, quant.name)
        wanted = set(targets)
        floats: list[Env] = [{} for _ in samples]  # float-model values that differ, per sample
        done: set[fx.Node] = set()
        journal = open_journal(program, quant.name, wanted)

        def visit(seg: Segment, runner: LayerwiseRunner) -> None:
            here = [n for n in seg.nodes if n in wanted]
            region = Region.of(seg.nodes, seg.label)
            later = any(u.op != "output" for n in region.outputs for u in n.users)
            if here or (later and any(n in floats[0] for n in region.inputs)):
                self._visit(quant, program, seg, region, here, scheme, runner, floats, journal)
            done.update(seg.nodes)
            for env in floats:
                for n in [n for n in env if all(u in done for u in n.users)]:
                    del env[n]

        LayerwiseRunner(program, samples).run(visit)

    def _visit(
        self,
        quant: LinearQuantEngine,
        program: Program,
        seg: Segment,
        region: Region,
        here: list[fx.Node],
        scheme: LinearQuantScheme,
        runner: LayerwiseRunner,
        floats: list[Env],
        journal: LayerJournal | None,
    ) -> None:
        """Record the layer's inputs, extend the float chain, tune and rewrite its linears
        (or, for a layer a stopped run finished, rewrite them as it recorded)."""
        t0 = time.perf_counter()
        act = scheme.activation
        static = act is not None and not act.dynamic
        try:
            recorder = Recorder(region)
        except RegionError as exc:
            raise UserError(f"{quant.name}: cannot run {seg.label} on its own: {exc}") from None
        observers: dict[fx.Node, Any] = {}
        if static:
            assert act is not None
            observers = {n.args[0]: quant.make_observer(act) for n in here}  # type: ignore[misc]

        def observe(node: fx.Node, args: tuple[Any, ...]) -> None:
            try:
                observers[node.args[0]].update(args[0])  # type: ignore[index]
            except ValueError as exc:
                raise UserError(f"{quant.name}: input of {node_loc(node)}: {exc}") from None

        hooks = merge_hooks(recorder.hooks(), {n: observe for n in here if static})
        runner.forward(upstream(seg.nodes, hooks), hooks)
        dev = self.device
        with torch.inference_mode(False):
            consts = {c: _to(program.weights.get(str(c.target)), dev) for c in region.constants}
            inputs = [{n: _to(v, dev) for n, v in rec.items()} for rec in recorder.samples]
            recorder.samples.clear()
            refs = float_references(region, inputs, consts, floats)
            if not here:
                return
            schemes: dict[fx.Node, LinearQuantScheme] = {}
            static_qparams: dict[fx.Node, Any] = {}
            act_quant: dict[fx.Node, ActQuant] = {}
            weights: dict[str, tuple[Tensor, TensorQuantSpec]] = {}
            for node in here:
                x, w_node = node.args[0], node.args[1]
                assert isinstance(x, fx.Node) and isinstance(w_node, fx.Node)
                w = consts[w_node]
                if not bool(torch.isfinite(w).all()):
                    raise UserError(f"{quant.name}: weight {w_node.target} holds NaN or inf")
                schemes[node] = quant.weight_scheme(
                    program, scheme, w.shape[1], node_loc(node) or node.name
                )
                weights[str(w_node.target)] = (w, schemes[node].weight)
                if act is not None:
                    qp = observers[x].calculate_qparams() if static else None
                    static_qparams[node] = qp
                    act_quant[node] = act_fake_quant(act, qp, dev)

            finished = journal.finished(seg.label) if journal is not None else None
            if finished is not None:  # the float chain above is extended; tuning is replayed
                for node in here:
                    qp, parts = replayed_results(finished, node, static)
                    quant.rewrite(program, node, schemes[node], qp, method=Replay(parts))
                losses = recorded_tensor(finished, "autoround", "losses").tolist()
                _report(quant, program, seg.label, *losses, time.perf_counter() - t0)
                return

            def loss_fn(i: int, quantized: Mapping[str, Tensor]) -> Tensor:
                values = {**inputs[i], **consts}
                for c in region.constants:
                    if str(c.target) in quantized:
                        values[c] = quantized[str(c.target)]
                with torch.autocast(torch.device(dev).type, torch.bfloat16, enabled=self.amp):
                    outs = run_region(region, values, act_quant)
                return output_loss(outs, refs[i])

            result = tune_block(weights, len(inputs), loss_fn, self.tune)
        _report(quant, program, seg.label, result.rtn_loss, result.loss, time.perf_counter() - t0)
        if result.kept_rtn and self.tune.iters:
            quant.stat(program, "layers where tuning lost to RTN")
        losses = torch.tensor([result.rtn_loss, result.loss], dtype=torch.float64)
        record = {"autoround:losses": losses}
        for node in here:
            key = linear_key(node)
            params = result.params[str(node.args[1].target)]  # type: ignore[union-attr]
            qp = static_qparams.get(node)
            qw = quant.rewrite(program, node, schemes[node], qp, params, method=self)
            record.update(recorded_results(key, qp, qw))
        if journal is not None:
            journal.record(seg.label, record)


def _report(
    quant: LinearQuantEngine, program: Program, label: str, rtn: float, ours: float, secs: float
) -> None:
    """Log and count the layer's output loss against plain rounding."""
    gain = 100.0 * (rtn - ours) / rtn if rtn > 0 else 0.0
    log.info(
        "%s: %s: output loss %.4g (RTN %.4g, %.1f%% lower) in %.1f s",
        quant.name,
        label,
        ours,
        rtn,
        gain,
        secs,
    )
    quant.stat(program, "layer output loss (sum over layers)", ours)
    quant.stat(program, "layer output loss of RTN (sum over layers)", rtn)


@dataclass(frozen=True, kw_only=True)
class AutoRound(LinearQuantEngine):
    """Quantize linears like linear-quant, with rounding and ranges learned per layer (AutoRound).

    Decoder layer by decoder layer, each layer's inputs are recorded on calibration samples
    (the outputs of the already-quantized layers before it), and every chosen linear gets a
    rounding offset V (per weight element, init 0, kept in [-0.5, 0.5]) and, with
    `minmax-tuning`, range factors alpha/beta per block (init 1, kept in [0.5, 1]) so that
    the weight is `s * (clamp(round(W / s + zp + V), qmin, qmax) - zp)` with `s`, `zp` the
    MinMax parameters of `[min * beta, max * alpha]` (rounding straight-through). Inputs of
    linears with quantized activations are fake-quantized as the scheme does at run time
    (dynamic per token, or with the static range observed as linear-quant observes it). The
    loss is the mean squared error (AutoRound's own; msModelSlim uses L1, and SignSGD only
    sees the gradient's sign) between the layer's outputs and the float model's outputs for
    the same sample (the float model run on float inputs, so a layer can make up for error
    left by the layers before it). Parameters move by SignSGD, `p -= lr * sign(grad)`, with
    the step size decayed linearly to 0; the parameters with the lowest step loss are kept,
    unless plain rounding does better on the first batch. Token-id calibration samples are
    packed into `seqlen`-token samples first (short documents are joined, not dropped).
    Training runs under bfloat16 autocast unless `amp=false`; the references, parameters
    and written codes are float32. The integer codes are written in linear-quant's QDQ form.
    Cost: one forward and backward of a layer per sample per step (about 35 s per layer of
    SmolLM2-135M with the defaults on one CPU core). Lossy.
    Reference: Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the
    Quantization of LLMs" (2023); msModelSlim `autoround_quant`.
    """

    name = "autoround"
    cli_role = "weight-method"

    scheme: SchemeName = option("w4a16", SCHEME_HELP)
    iters: int = option(200, "SignSGD steps per decoder layer (0: plain rounding).")
    lr: float | None = option(None, "Initial step size, decayed linearly to 0; none = 1/iters.")
    minmax_tuning: bool = option(True, "Also learn the weight range [min*beta, max*alpha].")
    batch_size: int = option(1, "Samples per step (their gradients are summed).")
    seqlen: int = option(
        512, "Tokens per training sample (token-id samples are packed); 0 = samples as given."
    )
    samples: int = option(0, "Train on at most this many (packed) samples; 0 = all.")
    seed: int = option(0, "Seed of the sample order.")
    device: str = option("cpu", "Device each layer is trained on (cpu, cuda, cuda:1, ...).")
    amp: bool = option(True, "Train under bfloat16 autocast (references and codes stay float).")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.iters >= 0, f"iters must be >= 0, got {self.iters}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch-size must be >= 1, got {self.batch_size}"),
            (self.seqlen >= 0, f"seqlen must be >= 0, got {self.seqlen}"),
            (self.samples >= 0, f"samples must be >= 0, got {self.samples}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise OptionError(f"pass 'autoround': {msg}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise OptionError(f"pass 'autoround': unknown device {self.device!r}") from None

    def tune_config(self) -> TuneConfig:
        """The SignSGD settings the options give (lr defaults to 1/iters)."""
        lr = self.lr if self.lr is not None else 1.0 / max(self.iters, 1)
        return TuneConfig(self.iters, lr, self.minmax_tuning, self.batch_size, self.seed)

    def training_samples(self, program: Program) -> list[tuple[Any, ...]]:
        """The calibration samples, packed to `seqlen` tokens when they are token ids."""
        return self.weight_method().training_samples(program, self.name)

    def weight_method(self) -> LayerTuning:
        """Layer-by-layer tuning with this pass's training options."""
        return LayerTuning(self.tune_config(), self.seqlen, self.samples, self.device, self.amp)
