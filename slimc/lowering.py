"""Helpers shared by the lowering passes: which fused linear a node is, and its activation."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc:: ops)

ops = torch.ops.slimc

FUSED_LINEARS = ("linear_w8a8", "linear_w8a16", "linear_w4a16", "linear_w4a8")
"""The fused quantized linear ops a lowering pass binds to kernels."""


class NotLowerable(ValueError):
    """A fused linear whose shapes or scheme a kernel family cannot take (message says why)."""


def is_call(node: object, op: object) -> bool:
    """Whether `node` is an fx call of `op`."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is op


def fused_kind(node: fx.Node) -> str | None:
    """The fused linear op's name (`linear_w8a8`, ...) if `node` calls one, else None."""
    t = node.target
    if not (node.op == "call_function" and isinstance(t, torch._ops.OpOverload)):
        return None
    name = t._schema.name.split("::")[-1]
    return name if t.namespace == "slimc" and name in FUSED_LINEARS else None


def per_token_source(xq: Any) -> tuple[fx.Node, int]:
    """(float activation, qmax) of `getitem(slimc.quantize_per_token(x, qmin, qmax), 0)`.

    Raises:
        NotLowerable: `xq` is not that, or its range is not a signed integer range.
    """
    if not (isinstance(xq, fx.Node) and xq.target is operator.getitem and xq.args[1] == 0):
        raise NotLowerable("dynamic activations are not produced by slimc.quantize_per_token")
    qt = xq.args[0]
    if not is_call(qt, ops.quantize_per_token.default):
        raise NotLowerable("dynamic activations are not produced by slimc.quantize_per_token")
    qmin = int(qt.args[1] if len(qt.args) > 1 else qt.kwargs.get("qmin", -128))
    qmax = int(qt.args[2] if len(qt.args) > 2 else qt.kwargs.get("qmax", 127))
    if qmin != -qmax - 1:
        raise NotLowerable(f"per-token range [{qmin}, {qmax}] is not a signed int range")
    return qt.args[0], qmax
