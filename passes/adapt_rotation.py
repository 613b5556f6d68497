"""adapt-rotation: QuaRot whose hidden-size Hadamard is refined by a rotation learned on data."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from slimc.analyses.residual_stream import ResidualStream
from slimc.analysis import AnalysisManager
from slimc.calibration import evenly_spaced
from slimc.errors import UserError
from slimc.linear_select import matches, product_path
from slimc.pass_base import OptionError, PassResult, option
from slimc.pipeline_spec import OptionValue
from slimc.program import Program
from slimc.quant.scheme import QuantTarget
from slimc.rotate.adapt import LearnedRotation, learn_rotation, pick_rows, quant_error, spread
from slimc.rotate.residual import ResidualRotation
from slimc.runner import LayerwiseRunner, Segment

log = logging.getLogger(__name__)


def collect_inputs(
    program: Program,
    linears: Sequence[fx.Node],
    samples: Sequence[tuple[Any, ...]],
    max_rows: int,
    progress: bool | None = None,
) -> torch.Tensor:
    """Calibration rows of the linears' inputs, at most `max_rows` in all (float32, [T, K]).

    Linears reading one value count once. The rows are split evenly over the distinct inputs,
    each input's share evenly over the samples run (evenly spaced over `samples`, no more than
    the largest share), and each sample's share is taken at evenly spaced tokens. The program
    runs layer by layer and is not changed.
    """
    first: dict[fx.Node, fx.Node] = {}
    for node in linears:
        x = node.args[0]
        assert isinstance(x, fx.Node)
        first.setdefault(x, node)
    shares = dict(zip(first, spread(max_rows, len(first)), strict=True))
    used = evenly_spaced(samples, max(shares.values(), default=0))
    quotas = {x: spread(share, len(used)) for x, share in shares.items()}
    rows: dict[fx.Node, list[torch.Tensor]] = {x: [] for x in first}
    hooked = {linear: x for x, linear in first.items()}

    def hook(node: fx.Node, args: tuple[Any, ...]) -> None:
        x = hooked[node]
        seen = rows[x]
        count = quotas[x][len(seen)]
        seen.append(pick_rows(args[0], count).to(torch.float32).clone())

    def visit(seg: Segment, runner: LayerwiseRunner) -> None:
        here = [n for n in seg.nodes if n in hooked]
        if here:
            runner.forward(seg.nodes, {n: hook for n in here}, advance=True)  # observes only

    LayerwiseRunner(program, used, progress=progress).run(visit)
    return torch.cat([r for x in first for r in rows[x]])


@dataclass(frozen=True, kw_only=True)
class AdaptRotation(ResidualRotation):
    """Adapt Rotation: QuaRot with its hidden-size Hadamard Q refined by a learned rotation R.

    After the norms are fused (the program still computes the float model), the inputs X of the
    stream-reading linears matching `layer-type` (default up_proj and gate_up_proj: the
    post-attention norm's output, MoE expert stacks matched by their name) are recorded on calibration data layer by layer, at most `max-samples` rows spread
    over layers, samples and tokens; they are collected before the rotation and rotated
    analytically, `A = X Q` (what those linears will read). Then, for up to `steps` steps:
    `B = Q_a(A R)` (symmetric per-token fake quantization to `quant-bits`, scale >= 1e-5),
    `R <- R polar((A R)^T B)` (orthogonal Procrustes, the polar factor from a float64 SVD), loss
    `||A R - Q_a(A R)||^2 / numel`; the best R is kept, stopping after `patience` steps without
    improvement once `min-steps` are done. QuaRot then folds `Q R` instead of Q (same seed,
    head rotations, untying, refusals). msModelSlim's adapt_rotation stages 1 and 2. The
    activation error of `A Q` and `A Q R` is reported in the statistics. Exact: float outputs
    are unchanged (`Q R` is orthogonal). Online rotations are Hadamard transforms, so models
    that need them are refused (quarot rotates them). LayerNorm models are handled as by
    quarot (mean-baking, `Q R` made to keep the all-ones direction).
    """

    name = "adapt-rotation"
    cli_role = "rotation"
    needs_calibration: ClassVar[bool] = True

    online: bool = option(
        False,
        "Must stay false: online rotations are Hadamard transforms and the learned rotation is "
        "not one (models needing them are refused; quarot rotates them at run time).",
    )
    layer_type: tuple[str, ...] = option(
        ("up_proj", "gate_up_proj"),
        "Module-path globs of the stream-reading linears (or MoE expert stacks) whose inputs are "
        "fitted.",
    )
    max_samples: int = option(
        2048, "Most input rows fitted, spread over the matched linears, samples and tokens."
    )
    quant_bits: int = option(
        4,
        "Bits of the per-token symmetric activation quantization the rotation is fitted to "
        "(match the activations of the quantizer that follows: 4 for w4a4, 8 for w8a8).",
    )
    steps: int = option(20, "Maximum Procrustes steps.")
    patience: int = option(5, "Stop after this many steps without a lower loss (past min-steps).")
    min_steps: int = option(6, "Steps always taken before patience can stop the learning.")

    @classmethod
    def for_scheme(cls, target: QuantTarget) -> dict[str, OptionValue]:
        """Learn against the activations' quantizer width (the weights' for weight-only schemes)."""
        scheme = target.scheme
        return {"quant-bits": (str((scheme.activation or scheme.weight).bits),)}

    def __post_init__(self) -> None:
        checks = [
            (not self.online, "online=true is not supported (quarot rotates such values)"),
            (bool(self.layer_type), "layer-type names no module path"),
            (self.max_samples >= 1, f"max-samples must be >= 1, got {self.max_samples}"),
            (2 <= self.quant_bits <= 8, f"quant-bits must be in [2, 8], got {self.quant_bits}"),
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.min_steps >= 0, f"min-steps must be >= 0, got {self.min_steps}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise OptionError(f"pass {self.name!r}: {msg}")

    @property
    def online_hint(self) -> str:
        return "quarot rotates it at run time; a learned rotation is not a Hadamard"

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        program.require_calibration(self.name)
        self._fitted_linears(am.get(ResidualStream))  # refuse before any weight changes
        return super().run(program, am)

    def hidden_rotation(
        self, program: Program, stream: ResidualStream, hadamard: torch.Tensor
    ) -> torch.Tensor:
        linears = self._fitted_linears(stream)
        x = collect_inputs(
            program,
            linears,
            program.require_calibration(self.name),
            self.max_samples,
        )
        if x.shape[0] == 0:
            raise UserError(f"{self.name}: the calibration samples gave no input rows")
        if not bool(torch.isfinite(x).all()):
            raise UserError(f"{self.name}: inputs of the fitted linears hold NaN or inf")
        a = x.double() @ hadamard
        learned = learn_rotation(a, self.quant_bits, self.steps, self.patience, self.min_steps)
        self._report(program, x, len(linears), learned)
        return hadamard @ learned.rotation

    def _fitted_linears(self, stream: ResidualStream) -> list[fx.Node]:
        chosen = [n for n in stream.readers if matches(product_path(n), self.layer_type)]
        if not chosen:
            raise UserError(
                f"{self.name}: no linear reading the residual stream matches layer-type="
                f"{','.join(self.layer_type)}"
            )
        return chosen

    def _report(
        self, program: Program, x: torch.Tensor, linears: int, learned: LearnedRotation
    ) -> None:
        unrotated = quant_error(x.double(), self.quant_bits)
        log.info(
            "%s: int%d per-token error of %d rows from %d linears: %.4g unrotated, %.4g with "
            "the Hadamard, %.4g learned (%.1f%% lower) after %d steps (best: step %d)",
            self.name,
            self.quant_bits,
            x.shape[0],
            linears,
            unrotated,
            learned.initial,
            learned.best,
            learned.reduction,
            learned.steps,
            learned.best_step,
        )
        self.stat(program, "fitted input rows", x.shape[0])
        self.stat(program, "fitted linears", linears)
        self.stat(program, "learning steps taken", learned.steps)
        self.stat(program, "quant error unrotated (X)", unrotated)
        self.stat(program, "quant error before (X Q, Hadamard)", learned.initial)
        self.stat(program, "quant error after (X Q R, learned)", learned.best)
        self.stat(program, "quant error reduction (%)", learned.reduction)
