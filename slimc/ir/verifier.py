"""IR verifier: graph well-formedness, typed values, allowed ops and stage invariants."""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from slimc.ir.printer import format_node
from slimc.ops.fused import FUSED_OP_NAMES, bound_args
from slimc.stage import Stage

if TYPE_CHECKING:
    from slimc.program import Program

ALLOWED_NAMESPACES = frozenset({"aten", "slimc"})
QDQ_OPS = frozenset({"quantize_affine", "dequantize_affine", "choose_qparams_affine"})
FLOAT_OPS = frozenset({"hadamard", "expert_linear"})
"""slimc ops on float values (online rotations, MoE experts), allowed at every stage."""


class VerificationError(AssertionError):
    """The IR breaks an invariant; the message names the node and the pass that left it."""


def _python_builtin(target: object) -> bool:
    module = getattr(target, "__module__", "")
    return (
        target is operator.getitem
        or module in ("_operator", "math")
        or target
        in (
            math.floor,
            math.ceil,
            torch.sym_int,
            torch.sym_float,
            torch.sym_max,
            torch.sym_min,
            torch.sym_not,
            torch.sym_ite,
        )
    )


def _slimc_op(node: fx.Node) -> str | None:
    t = node.target
    if isinstance(t, torch._ops.OpOverload) and t.namespace == "slimc":
        return t._schema.name.split("::")[-1]
    return None


def verify(program: Program, after: str | None = None) -> None:
    """Check the program's IR; raise VerificationError naming the first offending node."""
    where = f" after {after}" if after else ""
    graph = program.graph
    try:
        graph.lint()
    except Exception as exc:  # fx raises bare RuntimeError
        raise VerificationError(f"malformed graph{where}: {exc}") from exc

    def fail(node: fx.Node, why: str) -> VerificationError:
        return VerificationError(f"{why}{where}:\n  {format_node(node)}")

    for node in graph.nodes:
        if node.op in ("output",):
            continue
        if node.op == "call_module":
            raise fail(node, "call_module is not allowed in slimc IR")
        if node.op == "call_method":
            raise fail(node, "call_method is not allowed in slimc IR")
        if "val" not in node.meta and node.users:
            raise fail(node, "node has no meta['val'] (type)")
        if node.op == "get_attr" and str(node.target) not in program.weights:
            raise fail(node, f"constant {node.target!r} is missing from the weight store")
        if node.op != "call_function":
            continue
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if t.namespace not in ALLOWED_NAMESPACES:
                raise fail(node, f"op namespace {t.namespace!r} is not allowed")
        elif not _python_builtin(t):
            raise fail(node, f"call to {t!r} is not an ATen or slimc op")
        _check_stage(node, program.stage, fail)


def _check_stage(node: fx.Node, stage: Stage, fail: object) -> None:
    op = _slimc_op(node)
    if op is None:
        if stage >= Stage.FUSED and node.target is torch.ops.aten.linear.default:
            w = bound_args(node)["weight"]
            if isinstance(w, fx.Node) and _slimc_op(w) == "dequantize_affine":
                raise fail(node, "unfused quantized linear at the fused stage")  # type: ignore[operator]
        return
    if stage == Stage.ATEN and op not in FLOAT_OPS:
        raise fail(node, "slimc op in a float (aten) stage program")  # type: ignore[operator]
    if stage == Stage.QDQ and op in FUSED_OP_NAMES:
        raise fail(node, "fused op in a qdq stage program")  # type: ignore[operator]
