"""fuse-quantized-linear: rewrite QDQ linears into fused `slimc.linear_*` ops on packed weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc:: ops)
from slimc.analysis import AnalysisManager
from slimc.ir.builder import call, getitems, is_constant
from slimc.ops.packing import pack_int4
from slimc.pass_base import Pass, PassResult
from slimc.program import SCHEME_KEY, Program, node_loc
from slimc.quant.scheme import LinearQuantScheme
from slimc.stage import Stage

log = logging.getLogger(__name__)
aten = torch.ops.aten
ops = torch.ops.slimc


def _is(node: object, op: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is op


@dataclass(frozen=True)
class QdqLinear:
    """The pieces of one QDQ-form quantized linear."""

    linear: fx.Node
    scheme: LinearQuantScheme
    x: fx.Node
    qweight: fx.Node
    w_scale: fx.Node
    w_zero_point: fx.Node | None
    bias: fx.Node | None
    x_scale: fx.Node | None = None
    x_zero_point: fx.Node | None = None


def match_qdq_linear(node: fx.Node) -> QdqLinear | None:
    """Recognise `aten.linear(act?, dequantize_affine(const), bias?)` made by linear-quant."""
    scheme = node.meta.get(SCHEME_KEY)
    if not _is(node, aten.linear.default) or scheme is None:
        return None
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not _is(w, ops.dequantize_affine.default) or not is_constant(w.args[0]):
        return None
    pieces = dict(
        linear=node,
        scheme=scheme,
        qweight=w.args[0],
        w_scale=w.args[2],
        w_zero_point=w.args[3],
        bias=bias,
    )
    act = scheme.activation
    if act is None:
        return QdqLinear(x=x, **pieces)
    if not (_is(x, ops.dequantize_affine.default) and _is(x.args[0], ops.quantize_affine.default)):
        return None
    q = x.args[0]
    return QdqLinear(x=q.args[0], x_scale=q.args[2], x_zero_point=q.args[3], **pieces)


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
        target = program.unique_target(f"{node_loc(m.linear) or m.linear.name}.weight_packed")
        return program.constant_node(target, pack_int4(q), m.linear)

    def _fuse(self, program: Program, m: QdqLinear) -> fx.Node:
        before, origin = m.linear, str(self)
        act, wbits = m.scheme.activation, m.scheme.weight.bits
        qweight = self._packed(program, m)
        out_dtype = m.linear.meta["val"].dtype
        if act is None:
            op = ops.linear_w4a16.default if wbits == 4 else ops.linear_w8a16.default
            group = m.scheme.weight.group_size if m.scheme.weight.granularity == "group" else -1
            args = (m.x, qweight, m.w_scale, m.w_zero_point, group, m.bias)
            return call(program, op, args, before=before, origin=origin)
        if act.dynamic:
            qt = call(
                program,
                ops.quantize_per_token.default,
                (m.x, act.qmin, act.qmax),
                before=before,
                origin=origin,
            )
            xq, x_scale = getitems(program, qt, 2, before=before)
            if wbits == 4:
                args4 = (xq, x_scale, qweight, m.w_scale, m.bias, out_dtype)
                return call(program, ops.linear_w4a8.default, args4, before=before, origin=origin)
            args8 = (xq, x_scale, None, qweight, m.w_scale, m.bias, out_dtype)
            return call(program, ops.linear_w8a8.default, args8, before=before, origin=origin)
        quant = m.linear.args[0].args[0]  # the static quantize_affine node, kept
        args = (quant, m.x_scale, m.x_zero_point, qweight, m.w_scale, m.bias, out_dtype)
        return call(program, ops.linear_w8a8.default, args, before=before, origin=origin)
