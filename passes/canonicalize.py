"""canonicalize: bring captured graphs to the one canonical ATen form passes pattern-match on."""

from __future__ import annotations

from dataclasses import dataclass

from slimc.analysis import AnalysisManager
from slimc.canonical import canonicalize
from slimc.pass_base import Pass, PassResult, Preserved
from slimc.program import Program
from slimc.stage import Stage


@dataclass(frozen=True, kw_only=True)
class Canonicalize(Pass):
    """Remove export guards, runtime asserts and no-op casts; rewrite linears; drop dead code.

    Linears computed as matmul / mm / addmm on a constant 2-D weight (with or without a
    transpose, a bias add, or the reshapes around `addmm`: GPT-2's `Conv1D`, `FalconLinear`)
    become `aten.linear(x, weight[out, in], bias)`; a weight stored [in, out] is transposed in
    the program (write-back stores it back in the model's layout).

    Exact: every removed node is an assertion, a guard call or returns its input unchanged, and
    a rewritten linear computes the same product.
    """

    name = "canonicalize"
    accepts = frozenset(Stage)

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        changed = canonicalize(program, check=False)  # the pass manager verifies
        return PassResult(
            changed=bool(changed), preserved=Preserved.everything() if not changed else Preserved()
        )
