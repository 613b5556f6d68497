"""flex-awq-ssz: smoothing for low-bit weights, `s = mean|X|^alpha` with alpha searched against the real quantizers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from slimc.analyses.linear_groups import LinearGroup, LinearGroups
from slimc.analysis import AnalysisManager
from slimc.pass_base import GROUP_SIZE, OptionError, PassResult, Preserved, option
from slimc.pipeline_spec import OptionValue
from slimc.program import Program
from slimc.quant.scheme import QuantTarget, TensorQuantSpec
from slimc.smooth.base import SmoothingPass
from slimc.smooth.fold import fold_scale, target_weight, weight_column_absmax
from slimc.smooth.layerwise import Folded, smooth_layerwise
from slimc.smooth.scales import smoothquant_scale
from slimc.smooth.search import (
    WEIGHT_METHODS,
    GroupInput,
    ScaleEvaluator,
    argmin_later,
    check_search_options,
    grid,
    record_errors,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FlexAWQSSZ(SmoothingPass):
    """Flex AWQ SSZ: `s = max(mean|X|^alpha, 1e-5)` per channel, alpha searched for low-bit weights.

    For W4A8 / W4A16: beta is fixed at 0 and the scale follows the per-channel mean |X| of the
    group's input over every calibration token. Unless `alpha` is set, each group picks alpha
    from {0, step, ..., 1} (ties to the later) minimizing RMSE(Y_hat - Y) / RMS(Y) on `max-tokens`
    sampled tokens, Y = X W^T over all the group's linears (norm-linear groups with many linears
    use all of them, not msModelSlim's first two) and Y_hat the same product with `W * s`
    quantized by `weight-method` (int `weight-bits`, per channel or `group-size`) and `X / s` by
    `act-quant` (int8 per token for W4A8, none for W4A16). Unlike msModelSlim, which searches with
    max |X| and applies mean |X|, the same mean |X| formula is searched and folded. GQA o_proj
    scales are averaged over the query heads sharing a v_proj channel before being measured and
    folded. Groups are done layer by layer on activations of the already-smoothed earlier layers.
    Exact.
    """

    name = "flex-awq-ssz"
    cli_role = "anti-outlier"

    alpha: float | None = option(None, "Exponent of mean |X|; none = searched per group.")
    grid_step: float = option(0.05, "Step of the alpha search grid over [0, 1].")
    max_tokens: int = option(
        2048, "Calibration tokens per group kept for the search (spread over samples); -1 = all."
    )
    act_quant: Literal["per-token", "per-tensor", "none"] = option(
        "per-token",
        "Activation quantizer the search measures: int8 symmetric per-token (W4A8), int8 "
        "asymmetric per-tensor MinMax, or none (weight-only, W4A16).",
    )
    weight_method: Literal["minmax", "ssz"] = option(
        "minmax",
        "Weight quantizer the search measures: minmax, or ssz (use the ssz quantizer pass after).",
    )
    weight_bits: int = option(4, "Bits of the weight quantizer (4 or 8).")
    group_size: int = option(
        -1, "Weight group size along K; -1 = per output channel.", check=GROUP_SIZE
    )
    symmetric: bool = option(True, "Symmetric weight quantization.")
    seed: int = option(0, "Seed of the token sample.")

    @classmethod
    def for_scheme(cls, target: QuantTarget) -> dict[str, OptionValue]:
        """Search against the scheme's weight quantizer and activation quantizer."""
        opts: dict[str, OptionValue] = {
            "weight-bits": (str(target.scheme.weight.bits),),
            "symmetric": (str(target.weight_symmetric).lower(),),
            "act-quant": (target.activation_quant,),
        }
        if target.group_size is not None:
            opts["group-size"] = (str(target.group_size),)
        return opts

    def __post_init__(self) -> None:
        super().__post_init__()
        check_search_options(self.name, self.grid_step, self.max_tokens, alpha=self.alpha)
        if self.group_size == 0 or self.group_size < -1:
            raise OptionError(
                f"pass {self.name!r}: option 'group-size' must be -1 or positive, "
                f"got {self.group_size}"
            )
        if self.weight_bits not in (4, 8):
            raise OptionError(
                f"pass {self.name!r}: option 'weight-bits' must be 4 or 8, got {self.weight_bits}"
            )

    def weight_spec(self, k: int) -> TensorQuantSpec:
        """The weight quantizer for K input channels; per channel when `group-size` does not divide K."""
        if self.group_size > 0 and k % self.group_size == 0:
            return TensorQuantSpec(self.weight_bits, self.symmetric, "group", self.group_size)
        return TensorQuantSpec(self.weight_bits, self.symmetric, "channel")

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        groups = self.select(program, am)
        preserved = Preserved.of(LinearGroups)
        if not groups:
            return PassResult(changed=False, preserved=preserved)
        chosen: list[float] = []
        errors: list[tuple[float, float]] = []

        def handle(group: LinearGroup, inputs: GroupInput) -> Folded:
            wmax = weight_column_absmax(program, group)

            def scale(alpha: float) -> torch.Tensor:
                s = smoothquant_scale(inputs.absmean, wmax, alpha, 0.0)
                return group.reduce(s, "mean")

            if self.alpha is not None:
                choice: tuple[float, ...] = (self.alpha,)
            else:
                choice = self._search(program, group, inputs, scale)
            chosen_scale = scale(choice[0])
            fold_scale(program, group, chosen_scale, stats=None)
            note(group, choice)
            return Folded(chosen_scale, choice)

        def note(group: LinearGroup, choice: tuple[float, ...]) -> None:
            alpha = choice[0]
            chosen.append(alpha)
            if len(choice) == 1:
                log.info("%s: %s: alpha %.2f", self.name, group.name, alpha)
                return
            before, after = choice[1:]
            errors.append((before, after))
            log.info(
                "%s: %s: alpha %.2f, error %.4g -> %.4g",
                self.name, group.name, alpha, before, after,
            )  # fmt: skip

        smooth_layerwise(
            program,
            groups,
            handle,
            pass_name=self.name,
            max_tokens=self.max_tokens if self.alpha is None else 0,
            seed=self.seed,
            replayed=note,
        )
        self.stat(program, "mean alpha", sum(chosen) / len(chosen))
        record_errors(self, program, errors)
        return PassResult(changed=True, preserved=preserved)

    def _search(
        self,
        program: Program,
        group: LinearGroup,
        inputs: GroupInput,
        scale: Callable[[float], torch.Tensor],
    ) -> tuple[float, float, float]:
        """(best alpha, error unsmoothed, error at best alpha)."""
        spec = self.weight_spec(group.channels)
        if spec.granularity == "channel" and self.group_size > 0:
            log.info(
                "%s: group size %d does not divide K=%d of %s; searching per channel",
                self.name, self.group_size, group.channels, group.name,
            )  # fmt: skip
        quantize = WEIGHT_METHODS[self.weight_method]
        evaluate = ScaleEvaluator(
            group,
            inputs,
            target_weight(program, group),
            self.act_quant,
            lambda w: quantize(w, spec),
        )
        errors: dict[float, float] = {}

        def error(alpha: float) -> float:
            errors[alpha] = evaluate(scale(alpha))
            return errors[alpha]

        alpha, err = argmin_later(grid(self.grid_step), error)
        return alpha, errors[0.0], err
