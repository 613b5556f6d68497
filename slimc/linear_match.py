"""Matching of QDQ-form quantized linears (`aten.linear` on `dequantize_affine` of a constant)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc:: ops)
from slimc.ir.builder import is_constant
from slimc.ops.fused import bound_args
from slimc.program import SCHEME_KEY
from slimc.quant.scheme import LinearQuantScheme

__all__ = ["QdqLinear", "match_qdq_linear"]

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
    x_quant: fx.Node | None = None
    """The static activation's `quantize_affine` node (its int8 output feeds a fused linear)."""


def match_qdq_linear(node: fx.Node) -> QdqLinear | None:
    """Recognise `aten.linear(act?, dequantize_affine(const), bias?)` made by linear-quant."""
    scheme = node.meta.get(SCHEME_KEY)
    if not _is(node, aten.linear.default) or scheme is None:
        return None
    linear = bound_args(node)
    x, w = linear["input"], linear["weight"]
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
        bias=linear["bias"],
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
