"""smooth-quant: SmoothQuant, `s = A^alpha / W^(1-alpha)` folded into each norm and its linears."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from slimc.analyses.activation_stats import ActivationStats
from slimc.analysis import AnalysisManager
from slimc.pass_base import PassResult, option
from slimc.program import Program
from slimc.smooth.base import SmoothingPass, SubgraphKind
from slimc.smooth.fold import fold_scale, weight_column_absmax
from slimc.smooth.scales import smoothquant_scale

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SmoothQuant(SmoothingPass):
    """SmoothQuant: migrate activation outliers into the weights with `s = A^a / W^(1-a)`.

    A is the per-channel absolute maximum of the group's input over the calibration set (the
    ActivationStats analysis), W the per-column absolute maximum over the group's linears.
    The input is divided by s (folded into the norm weight, or the producer linear's rows) and
    the linears' columns multiplied by s, so the float model computes the same function. Exact.
    """

    name = "smooth-quant"
    cli_role = "anti-outlier"
    calibrates_across_ranks = True  # reads only ActivationStats, which is all-reduced

    alpha: float = option(0.5, "Migration strength: 0 keeps activations, 1 moves all to weights.")
    enable_subgraph_type: tuple[SubgraphKind, ...] = option(
        ("norm-linear",), "Group kinds to smooth: norm-linear, ov, up-down, linear-linear."
    )

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        groups = self.select(program, am)
        if not groups:
            return PassResult(changed=False, preserved=self.preserved())
        stats = am.get(ActivationStats)
        for group in groups:
            act = stats[group.input].absmax
            scale = smoothquant_scale(
                act, weight_column_absmax(program, group), self.alpha, 1.0 - self.alpha
            )
            fold_scale(program, group, group.reduce(scale, "mean"), stats)
        return PassResult(changed=True, preserved=self.preserved())
