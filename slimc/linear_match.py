"""Matching of QDQ-form quantized linears (`aten.linear` on `dequantize_affine` of a constant)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc:: ops)
from slimc.ir.builder import constant_value, is_constant
from slimc.ops.fused import bound_args
from slimc.program import SCHEME_KEY, Program
from slimc.quant.scheme import LinearQuantScheme

__all__ = ["QdqLinear", "match_qdq_experts", "match_qdq_linear", "qdq_constants"]

aten = torch.ops.aten
ops = torch.ops.slimc
EXPERT_LINEAR = ops.expert_linear.default


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
    x_quant: fx.Node | None = None
    """The static activation's `quantize_affine` node (its int8 output feeds a fused linear)."""


def match_qdq_linear(node: fx.Node) -> QdqLinear | None:
    """Recognise `aten.linear(act?, dequantize_affine(const), bias?)` made by linear-quant."""
    if not _is(node, aten.linear.default):
        return None
    linear = bound_args(node)
    return _match_qdq(node, linear["input"], linear["weight"], linear["bias"])


def match_qdq_experts(node: fx.Node) -> QdqLinear | None:
    """Recognise `slimc::expert_linear(act?, dequantize_affine(const [E, N, K]), ids, bias?)`
    made by linear-quant: the pieces are stacks over the experts (`qweight` [E, N, K], ...)."""
    if not _is(node, EXPERT_LINEAR):
        return None
    return _match_qdq(node, node.args[0], node.args[1], node.args[3])


def _match_qdq(node: fx.Node, x: object, w: object, bias: object) -> QdqLinear | None:
    scheme = node.meta.get(SCHEME_KEY)
    if scheme is None:
        return None
    if not _is(w, ops.dequantize_affine.default):
        return None
    dq = bound_args(w)
    if not is_constant(dq["q"]):
        return None
    pieces = dict(
        linear=node,
        scheme=scheme,
        qweight=dq["q"],
        w_scale=dq["scale"],
        w_zero_point=dq["zero_point"],
        bias=bias,
    )
    act = scheme.activation
    if act is None:
        return QdqLinear(x=x, **pieces)
    if not _is(x, ops.dequantize_affine.default):
        return None
    q = bound_args(x)["q"]
    if not _is(q, ops.quantize_affine.default):
        return None
    quant = bound_args(q)
    return QdqLinear(
        x=quant["x"],
        x_scale=quant["scale"],
        x_zero_point=quant["zero_point"],
        x_quant=q,
        **pieces,
    )


def qdq_constants(program: Program, m: QdqLinear) -> dict[str, torch.Tensor | None]:
    """The constants of a matched quantized linear, named as `QuantizedLinear.from_codes` takes
    them: codes, weight scale and zero point, bias, and the input range of static activations."""
    act = m.scheme.activation
    static = act is not None and not act.dynamic
    return {
        "qweight": constant_value(program, m.qweight),
        "weight_scale": constant_value(program, m.w_scale),
        "weight_zero_point": constant_value(program, m.w_zero_point),
        "bias": constant_value(program, m.bias),
        "input_scale": constant_value(program, m.x_scale) if static else None,
        "input_zero_point": constant_value(program, m.x_zero_point) if static else None,
    }
