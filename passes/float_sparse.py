"""float-sparse: prune linears by ADMM against their input Hessians, then round to short fp16."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx

from slimc.analysis import AnalysisManager
from slimc.errors import UserError
from slimc.linear_select import float_linears, matches
from slimc.pass_base import OptionError, Pass, PassResult, option
from slimc.program import Program, node_loc
from slimc.quant.admm import AdmmConfig, admm_prune, magnitude_prune, relative_output_error
from slimc.quant.hessian import HessianAccumulator
from slimc.quant.mantissa import protected_round
from slimc.rotate.fold import WEIGHT, untie
from slimc.runner import LayerwiseRunner, Segment
from slimc.stage import Stage

log = logging.getLogger(__name__)


@dataclass
class _Totals:
    """Per-linear results summed over the pass, reported once at the end."""

    linears: int = 0
    numel: int = 0
    zeros: int = 0
    kept: int = 0
    wins: int = 0
    errors: dict[str, float] = field(default_factory=dict)

    def add_error(self, key: str, value: float) -> None:
        self.errors[key] = self.errors.get(key, 0.0) + value


@dataclass(frozen=True, kw_only=True)
class FloatSparse(Pass):
    """Float sparse: prune linear weights by ADMM against input Hessians, round to short fp16.

    For each chosen linear, layer by layer on calibration data (each layer sees the outputs of
    the already-pruned layers before it), the input Hessian `H ~ sum x x^T` is accumulated
    (linears reading one value share it; `E[x^2]` per input channel is its diagonal). The weight
    is pruned to exactly `round(sparse-ratio * N * K)` zeros, unstructured over the whole matrix,
    by ADMM on `tr(dW H dW^T)`: normalized by `d = sqrt(diag H)`, damped by
    `0.1 * mean(diag H~)`, penalty rho = 1, `iters` iterations of which the first `mask-iters`
    recompute the mask (see `slimc.quant.admm.admm_prune`). Then msModelSlim's precision
    protection rounds every weight to fp16 with `keep-bits` mantissa bits, except the
    `keep-proportion` with the largest `|w - q(w)| * sqrt(E[x^2])`, which keep full fp16; zeros
    stay zero and non-zero weights stay non-zero. The new weights replace the old ones in place
    (the linears stay `aten.linear` and the program stays at the ATEN stage, so quantization
    can follow). Statistics compare the Hessian-weighted output error with magnitude pruning at
    the same ratio. msModelSlim's float_sparse (section 3.19). Lossy.
    """

    name = "float-sparse"
    accepts = frozenset({Stage.ATEN})
    produces = Stage.ATEN
    needs_calibration: ClassVar[bool] = True
    exact: ClassVar[bool] = False

    sparse_ratio: float = option(0.3, "Fraction of each linear's weights set to zero.")
    iters: int = option(20, "ADMM iterations.")
    mask_iters: int = option(15, "Leading ADMM iterations that recompute the sparsity mask.")
    round_mantissa: bool = option(
        True, "Round the weights to fp16 with keep-bits mantissa bits (precision protection)."
    )
    keep_bits: int = option(2, "Mantissa bits (of fp16's 10) kept by the rounding.")
    keep_proportion: float = option(
        0.02, "Share of each linear's weights kept in full fp16: largest |w - q(w)| sqrt(E[x^2])."
    )
    ignore: tuple[str, ...] = option(("lm_head",), "Module-path globs left unchanged.")
    only: tuple[str, ...] = option((), "If set, sparsify only module paths matching these globs.")

    def __post_init__(self) -> None:
        checks = [
            (
                0 <= self.sparse_ratio < 1,
                f"sparse-ratio must be in [0, 1), got {self.sparse_ratio}",
            ),
            (self.iters >= 1, f"iters must be >= 1, got {self.iters}"),
            (
                0 <= self.mask_iters <= self.iters,
                f"mask-iters must be in [0, iters], got {self.mask_iters}",
            ),
            (0 <= self.keep_bits <= 10, f"keep-bits must be in [0, 10], got {self.keep_bits}"),
            (
                0 <= self.keep_proportion <= 1,
                f"keep-proportion must be in [0, 1], got {self.keep_proportion}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise OptionError(f"pass {self.name!r}: {msg}")

    def admm_config(self) -> AdmmConfig:
        return AdmmConfig(self.sparse_ratio, self.iters, self.mask_iters)

    def targets(self, program: Program) -> list[fx.Node]:
        chosen = []
        for node in float_linears(program):
            path = node_loc(node)
            if self.only and not matches(path, self.only):
                continue
            if not matches(path, self.ignore):
                chosen.append(node)
        return chosen

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        targets = self.targets(program)
        if not targets:
            log.warning(
                "%s: no linear matched (only=%s ignore=%s)", self.name, self.only, self.ignore
            )
            return PassResult(changed=False)
        untie(program, [(n, WEIGHT) for n in targets])  # a shared weight: one copy per linear
        samples = program.require_calibration(self.name)
        wanted = set(targets)
        totals = _Totals()

        def visit(seg: Segment, runner: LayerwiseRunner) -> None:
            here = [n for n in seg.nodes if n in wanted]
            if not here:
                return
            hessians: dict[fx.Node, HessianAccumulator] = {}
            for node in here:
                x = node.args[0]
                assert isinstance(x, fx.Node)
                if x not in hessians:
                    hessians[x] = HessianAccumulator(int(x.meta["val"].shape[-1]))

            def hook(node: fx.Node, args: tuple[Any, ...]) -> None:
                try:
                    hessians[node.args[0]].update(args[0])  # type: ignore[index]
                except ValueError as exc:
                    raise UserError(f"{self.name}: input of {node_loc(node)}: {exc}") from None

            runner.forward(seg.nodes, {n: hook for n in here})
            for node in here:
                self._sparsify(program, node, hessians[node.args[0]], totals)  # type: ignore[index]

        LayerwiseRunner(program, samples).run(
            visit
        )
        program.recompile()
        self._report(program, totals)
        return PassResult(changed=True)

    def _sparsify(
        self, program: Program, node: fx.Node, acc: HessianAccumulator, totals: _Totals
    ) -> None:
        path = node_loc(node) or node.name
        target = str(node.args[1].target)  # type: ignore[union-attr]
        weight = program.weights.get(target)
        if acc.rows == 0:
            raise UserError(f"{self.name}: {path} saw no calibration input")
        hessian = acc.hessian
        try:
            sparse = admm_prune(weight, hessian, self.admm_config())
        except ValueError as exc:
            raise UserError(f"{self.name}: {path}: {exc}") from None
        ours = relative_output_error(weight, sparse, hessian)
        magnitude = relative_output_error(
            weight, magnitude_prune(weight, self.sparse_ratio), hessian
        )
        final = sparse
        if self.round_mantissa:
            importance = torch.diagonal(hessian).clamp(min=0).div(2).sqrt()  # sqrt(E[x^2])
            final, kept = protected_round(sparse, importance, self.keep_bits, self.keep_proportion)
            totals.kept += int(kept.sum())
            totals.add_error("after rounding", relative_output_error(weight, final, hessian))
        program.weights.set(target, final.to(weight.dtype))
        zeros = int((final == 0).sum())
        totals.linears += 1
        totals.numel += final.numel()
        totals.zeros += zeros
        totals.wins += ours < magnitude
        totals.add_error("ADMM", ours)
        totals.add_error("magnitude pruning", magnitude)
        log.info(
            "%s: %s: %.2f%% zeros, relative output error %.4g (magnitude pruning %.4g)",
            self.name,
            path,
            100.0 * zeros / final.numel(),
            ours,
            magnitude,
        )

    def _report(self, program: Program, totals: _Totals) -> None:
        n = max(totals.linears, 1)
        self.stat(program, "sparsified linears", totals.linears)
        self.stat(program, "achieved sparsity (%)", 100.0 * totals.zeros / max(totals.numel, 1))
        self.stat(program, "linears where ADMM beats magnitude pruning", totals.wins)
        for key, value in totals.errors.items():
            self.stat(program, f"mean relative output error ({key})", value / n)
        if self.round_mantissa:
            self.stat(program, "weights kept in fp16 (precision protection)", totals.kept)
