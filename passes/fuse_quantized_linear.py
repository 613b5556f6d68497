"""fuse-quantized-linear: rewrite QDQ linears into fused `slimc.linear_*` ops on packed weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc:: ops)
from slimc.analysis import AnalysisManager
from slimc.ir.builder import call, getitems, new_constant
from slimc.linear_match import QdqLinear, match_qdq_linear
from slimc.ops.fused import LinearArgs, fused_linear_for
from slimc.ops.packing import pack_int4
from slimc.pass_base import Pass, PassResult
from slimc.program import SCHEME_KEY, Program
from slimc.stage import Stage

log = logging.getLogger(__name__)
aten = torch.ops.aten
ops = torch.ops.slimc


@dataclass(frozen=True, kw_only=True)
class FuseQuantizedLinear(Pass):
    """Fuse QDQ linears into `slimc.linear_w8a8/w4a8/w8a16/w4a16` on packed weights.

    int4 weights are packed two per byte (low nibble = even k); static activations keep their
    `quantize_affine` (its int8 output feeds the fused op); dynamic per-token activations use
    `slimc.quantize_per_token`. Exact: the fused ops compute what the QDQ form computes (integer
    accumulation replaces float accumulation of the same integer products).
    """

    name = "fuse-quantized-linear"
    accepts = frozenset({Stage.QDQ})
    produces = Stage.FUSED

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        count = 0
        for node in list(program.graph.find_nodes(op="call_function", target=aten.linear.default)):
            m = match_qdq_linear(node)
            if m is None:
                continue
            fused = self._fuse(program, m)
            fused.meta[SCHEME_KEY] = m.scheme
            node.replace_all_uses_with(fused)
            program.graph.erase_node(node)
            count += 1
        if count:
            program.recompile()
            self.stat(program, "fused linears", count)
        return PassResult(changed=count > 0)

    def _packed(self, program: Program, m: QdqLinear) -> fx.Node:
        if m.scheme.weight.bits != 4:
            return m.qweight
        q = program.weights.get(str(m.qweight.target))
        return new_constant(program, m.linear, "weight_packed", pack_int4(q))

    def _fuse(self, program: Program, m: QdqLinear) -> fx.Node:
        before, origin = m.linear, str(self)
        act, fused = m.scheme.activation, fused_linear_for(m.scheme)
        weights = dict(
            weight=self._packed(program, m),
            weight_scale=m.w_scale,
            bias=m.bias,
        )
        if act is None:
            group = m.scheme.weight.group_size if m.scheme.weight.granularity == "group" else -1
            args = LinearArgs(m.x, weight_zero_point=m.w_zero_point, group_size=group, **weights)
            return call(program, fused.op, fused.call_args(args), before=before, origin=origin)
        out_dtype = m.linear.meta["val"].dtype
        if act.dynamic:
            qt = call(
                program,
                ops.quantize_per_token.default,
                (m.x, act.qmin, act.qmax),
                before=before,
                origin=origin,
            )
            xq, x_scale = getitems(program, qt, 2, before=before)
            args = LinearArgs(xq, input_scale=x_scale, out_dtype=out_dtype, **weights)
        else:  # the static quantize_affine node is kept: its int8 output feeds the fused op
            args = LinearArgs(
                m.x_quant,
                input_scale=m.x_scale,
                input_zero_point=m.x_zero_point,
                out_dtype=out_dtype,
                **weights,
            )
        return call(program, fused.op, fused.call_args(args), before=before, origin=origin)
