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
from slimc.smooth.shift import fold_shift

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class IterSmooth(SmoothingPass):
    """Iterative Smooth: `s = max(A^a / W^(1-a), scale-min)` on norm-linear, ov, up-down, linear-linear.

    Groups are smoothed layer by layer and, inside a layer, in msModelSlim's order (up-down, ov,
    linear-linear, norm-linear), each scale computed from the current weights of the whole
    group (the column maximum over all its linears) and the activation statistics as updated by
    the scales folded before it. For grouped-query attention the o_proj scale is reduced to one
    value per v_proj channel (`ov-reduce`: mean over the query heads sharing it, or max) and
    repeated per head. With `shift=true` each norm-linear input channel is also centred
    (msModelSlim's asymmetric mode): the norm gains an output bias and the linears a bias, which
    `slimc.compile` writes back as `slimc.nn.OutputBias` around the norm module. Exact.
    """

    name = "iter-smooth"
    calibrates_across_ranks = True  # reads only ActivationStats, which is all-reduced
    cli_role = "anti-outlier"

    alpha: float = option(0.9, "Migration strength: 0 keeps activations, 1 moves all to weights.")
    scale_min: float = option(1e-5, "Lower bound of every scale.")
    ov_reduce: Literal["mean", "max"] = option(
        "mean", "How o_proj channels sharing one v_proj channel (GQA) combine their scales."
    )
    shift: bool = option(
        False,
        "Centre each norm-linear input channel first (msModelSlim's symmetric=false): shift = "
        "(max+min)/2, folded into a bias after the norm and into the linears' biases.",
    )

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        groups = self.select(program, am)
        if not groups:
            return PassResult(changed=False, preserved=self.preserved())
        stats = am.get(ActivationStats)
        shifted = False
        for group in groups:
            st = stats[group.input]
            # a MoE block's experts read per-choice copies of the input: no shared bias to shift
            centre = self.shift and group.kind == "norm-linear" and not group.reads_experts
            scale = smoothquant_scale(
                (st.max - st.min) / 2 if centre else st.absmax,
                weight_column_absmax(program, group),
                self.alpha,
                1.0 - self.alpha,
                self.scale_min,
            )
            scale = group.reduce(scale, self.ov_reduce)
            shift = (st.max + st.min) / 2
            fold_scale(program, group, scale, stats)
            if centre:
                fold_shift(program, group, shift / scale, stats, origin=str(self))
                self.stat(program, "shifts folded into biases")
                shifted = True
        if shifted:
            program.recompile()
        return PassResult(changed=True, preserved=self.preserved())
