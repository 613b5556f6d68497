"""flex-smooth-quant: SmoothQuant with decoupled exponents `s = A^alpha / W^beta`, grid-searched per group."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from slimc.analyses.linear_groups import LinearGroup, LinearGroups
from slimc.analysis import AnalysisManager
from slimc.pass_base import OptionError, PassResult, Preserved, option
from slimc.pipeline_spec import OptionValue
from slimc.program import Program
from slimc.quant.scheme import QuantTarget, TensorQuantSpec
from slimc.smooth.base import SmoothingPass
from slimc.smooth.fold import fold_scale, target_weight, weight_column_absmax
from slimc.smooth.layerwise import Folded, smooth_layerwise
from slimc.smooth.scales import smoothquant_scale
from slimc.smooth.search import (
    GroupInput,
    ScaleEvaluator,
    argmin_later,
    check_search_options,
    grid,
    minmax_weight,
    record_errors,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FlexSmoothQuant(SmoothingPass):
    """Flex Smooth Quant: `s = max(A^alpha / W^beta, 1e-5)` with alpha, beta searched per group.

    A is the per-channel max |X| of the group's input over every calibration token, W the
    per-column max |W| over the group's linears (current weights). Unset `alpha` / `beta` are
    chosen per group by msModelSlim's two-stage grid search: alpha in {0, step, ..., 1} with
    beta = 1 - alpha, then beta over the grid with the best alpha fixed (kept only if its error
    is <= the first stage's best); ties go to the later candidate. A candidate's error is
    RMSE(Y_hat - Y) / RMS(Y) on `max-tokens` sampled calibration tokens, Y = X W^T over all the
    group's linears and Y_hat the same product with `X / s` fake-quantized by `act-quant` and
    `W * s` by int `weight-bits` symmetric per output channel. For grouped-query attention the
    o_proj scale is averaged over the query heads sharing a v_proj channel, and the candidate is
    measured with that reduced scale, so what is measured is what is folded. Groups are done
    layer by layer (up-down, ov, linear-linear, norm-linear inside a layer) on activations of the
    already-smoothed earlier layers. Exact.
    """

    name = "flex-smooth-quant"
    cli_role = "anti-outlier"

    alpha: float | None = option(None, "Activation exponent; none = searched per group.")
    beta: float | None = option(None, "Weight exponent; none = searched per group.")
    grid_step: float = option(0.05, "Step of the alpha / beta search grid over [0, 1].")
    max_tokens: int = option(
        2048, "Calibration tokens per group kept for the search (spread over samples); -1 = all."
    )
    act_quant: Literal["per-token", "per-tensor"] = option(
        "per-token",
        "Activation quantizer the search measures: int8 symmetric per-token (dynamic) or "
        "int8 asymmetric per-tensor MinMax (static w8a8).",
    )
    weight_bits: int = option(8, "Bits of the symmetric per-output-channel weight quantizer.")
    seed: int = option(0, "Seed of the token sample.")

    @classmethod
    def for_scheme(cls, target: QuantTarget) -> dict[str, OptionValue]:
        """Search against the scheme's activation quantizer (per-token when it has none)."""
        static = target.activation_quant == "per-tensor"
        return {"act-quant": ("per-tensor" if static else "per-token",)}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_search_options(
            self.name, self.grid_step, self.max_tokens, alpha=self.alpha, beta=self.beta
        )
        if self.weight_bits not in (4, 8):
            raise OptionError(
                f"pass {self.name!r}: option 'weight-bits' must be 4 or 8, got {self.weight_bits}"
            )

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        groups = self.select(program, am)
        preserved = Preserved.of(LinearGroups)
        if not groups:
            return PassResult(changed=False, preserved=preserved)
        searched = self.alpha is None or self.beta is None
        chosen: list[tuple[float, float]] = []
        errors: list[tuple[float, float]] = []

        def handle(group: LinearGroup, inputs: GroupInput) -> Folded:
            alpha, beta, before, after = self._choose(program, group, inputs)
            scale = self._scale(program, group, inputs, alpha, beta)
            fold_scale(program, group, scale, stats=None)
            note(group, (alpha, beta, before, after))
            return Folded(scale, (alpha, beta, before, after))

        def note(group: LinearGroup, choice: tuple[float, ...]) -> None:
            alpha, beta, before, after = choice
            chosen.append((alpha, beta))
            if searched:
                errors.append((before, after))
                log.info(
                    "%s: %s: alpha %.2f beta %.2f, error %.4g -> %.4g",
                    self.name, group.name, alpha, beta, before, after,
                )  # fmt: skip
            else:
                log.info("%s: %s: alpha %.2f beta %.2f", self.name, group.name, alpha, beta)

        smooth_layerwise(
            program,
            groups,
            handle,
            pass_name=self.name,
            max_tokens=self.max_tokens if searched else 0,
            seed=self.seed,
            replayed=note,
        )
        n = len(chosen)
        self.stat(program, "mean alpha", sum(a for a, _ in chosen) / n)
        self.stat(program, "mean beta", sum(b for _, b in chosen) / n)
        record_errors(self, program, errors)
        return PassResult(changed=True, preserved=preserved)

    def _scale(
        self, program: Program, group: LinearGroup, inputs: GroupInput, alpha: float, beta: float
    ) -> torch.Tensor:
        """The per-source-channel scale for (alpha, beta), GQA channels averaged."""
        w = weight_column_absmax(program, group)
        return group.reduce(smoothquant_scale(inputs.absmax, w, alpha, beta), "mean")

    def _choose(
        self, program: Program, group: LinearGroup, inputs: GroupInput
    ) -> tuple[float, float, float, float]:
        """(alpha, beta, error unsmoothed, error chosen); errors are nan when nothing is searched."""
        if self.alpha is not None and self.beta is not None:
            return self.alpha, self.beta, float("nan"), float("nan")
        spec = TensorQuantSpec(self.weight_bits, True, "channel")
        evaluate = ScaleEvaluator(
            group,
            inputs,
            target_weight(program, group),
            self.act_quant,
            lambda w: minmax_weight(w, spec),
        )
        wmax = weight_column_absmax(program, group)
        cache: dict[tuple[float, float], float] = {}

        def error(cand: tuple[float, float]) -> float:
            if cand not in cache:
                s = smoothquant_scale(inputs.absmax, wmax, cand[0], cand[1])
                cache[cand] = evaluate(group.reduce(s, "mean"))
            return cache[cand]

        steps = grid(self.grid_step)
        best = None
        if self.alpha is None:  # stage 1: alpha over the grid, beta = 1 - alpha (or fixed)
            fixed = self.beta
            cands = [(a, round(1.0 - a, 9) if fixed is None else fixed) for a in steps]
            best = argmin_later(cands, error)
        if self.beta is None:  # stage 2: beta over the grid, the best alpha fixed
            alpha = best[0][0] if best is not None else self.alpha
            assert alpha is not None
            best = argmin_later([(alpha, b) for b in steps], error, best)
        assert best is not None
        before = evaluate(torch.ones(group.source_channels(), dtype=torch.float64))
        (alpha, beta), err = best
        return alpha, beta, before, err
