"""SmoothingPass: the options and group selection every smoothing pass shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

from slimc.analyses.activation_stats import ActivationStats
from slimc.analyses.linear_groups import GROUP_KINDS, LinearGroup, LinearGroups
from slimc.analysis import AnalysisManager
from slimc.linear_select import matches
from slimc.pass_base import OptionError, Pass, Preserved, option
from slimc.program import Program, node_loc
from slimc.stage import Stage

log = logging.getLogger(__name__)

SubgraphKind = Literal["norm-linear", "ov", "up-down", "linear-linear"]


@dataclass(frozen=True, kw_only=True)
class SmoothingPass(Pass):
    """Base of the smoothing passes: which groups to smooth, and the analyses they keep valid."""

    accepts = frozenset({Stage.ATEN})
    produces = Stage.ATEN
    needs_calibration: ClassVar[bool] = True
    exact: ClassVar[bool] = True

    enable_subgraph_type: tuple[SubgraphKind, ...] = option(
        GROUP_KINDS, "Group kinds to smooth: norm-linear, ov, up-down, linear-linear."
    )
    include: tuple[str, ...] = option(("*",), "Module-path globs of target linears to smooth.")
    exclude: tuple[str, ...] = option(("lm_head",), "Module-path globs of target linears to skip.")

    def __post_init__(self) -> None:
        if not self.enable_subgraph_type:
            raise OptionError(f"pass {self.name!r}: enable-subgraph-type names no group kind")

    def select(self, program: Program, am: AnalysisManager) -> list[LinearGroup]:
        """The discovered groups this pass smooths, layer by layer in folding priority order."""
        chosen = []
        found = am.get(LinearGroups)
        for group in found.in_layer_order():
            if group.kind not in self.enable_subgraph_type:
                continue
            paths = [node_loc(t) for t in group.targets]
            if any(matches(p, self.exclude) for p in paths):
                continue
            if not all(matches(p, self.include) for p in paths):
                continue
            chosen.append(group)
        if not chosen:
            kinds = ", ".join(self.enable_subgraph_type)
            refused = [r for r in found.refused if r.kind in self.enable_subgraph_type]
            why = ""
            if refused:
                more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
                why = f"; refused: {refused[0]}{more}"
            log.warning("%s: no group selected (kinds %s)%s", self.name, kinds, why)
        for group in chosen:
            self.stat(program, f"smoothed {group.kind} groups")
        return chosen

    @staticmethod
    def preserved() -> Preserved:
        """Smoothing changes constants only: groups stay valid, statistics are updated in place."""
        return Preserved.of(LinearGroups, ActivationStats)
