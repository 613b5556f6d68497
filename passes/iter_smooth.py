"""iter-smooth: msModelSlim's Iterative Smooth (alpha 0.9) over all four group kinds, layer by layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from slimc.analyses.activation_stats import ActivationStats
from slimc.analysis import AnalysisManager
from slimc.pass_base import PassResult, option
from slimc.program import Program
from slimc.smooth.base import SmoothingPass
from slimc.smooth.fold import fold_scale, weight_column_absmax
from slimc.smooth.scales import smoothquant_scale

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class IterSmooth(SmoothingPass):
    """Iterative Smooth: `s = max(A^a / W^(1-a), scale-min)` on norm-linear, ov, up-down, linear-linear.

    Groups are smoothed layer by layer and, inside a layer, in msModelSlim's order (up-down, ov,
    linear-linear, norm-linear), each scale computed from the current weights of the whole
    group (the column maximum over all its linears) and the activation statistics as updated by
    the scales folded before it. For grouped-query attention the o_proj scale is reduced to one
    value per v_proj channel (`ov-reduce`: mean over the query heads sharing it, or max) and
    repeated per head. Exact.
    """

    name = "iter-smooth"

    alpha: float = option(0.9, "Migration strength: 0 keeps activations, 1 moves all to weights.")
    scale_min: float = option(1e-5, "Lower bound of every scale.")
    ov_reduce: Literal["mean", "max"] = option(
        "mean", "How o_proj channels sharing one v_proj channel (GQA) combine their scales."
    )

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        groups = self.select(program, am)
        if not groups:
            return PassResult(changed=False, preserved=self.preserved())
        stats = am.get(ActivationStats)
        for group in groups:
            scale = smoothquant_scale(
                stats[group.input].absmax,
                weight_column_absmax(program, group),
                self.alpha,
                1.0 - self.alpha,
                self.scale_min,
            )
            fold_scale(program, group, group.reduce(scale, self.ov_reduce), stats)
        return PassResult(changed=True, preserved=self.preserved())
