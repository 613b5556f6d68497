"""The lowering passes' shared driver (`LoweringPass`) and helpers: which fused linear a node is,
and which activation feeds it."""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc:: ops)
from slimc.ir.builder import call
from slimc.kernel import KERNEL_KEY, KernelBinding
from slimc.ops.fused import FusedLinear, bound_args, fused_linear_kind
from slimc.pass_base import Pass, PassResult
from slimc.program import SCHEME_KEY, node_loc
from slimc.stage import Stage

if TYPE_CHECKING:
    from slimc.analysis import AnalysisManager
    from slimc.program import Program

log = logging.getLogger(__name__)

ops = torch.ops.slimc


class NotLowerable(ValueError):
    """A fused linear whose shapes or scheme a kernel family cannot take (message says why)."""


def is_call(node: object, op: object) -> bool:
    """Whether `node` is an fx call of `op`."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is op


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
    args = bound_args(qt)
    qmin, qmax = int(args["qmin"]), int(args["qmax"])
    if qmin != -qmax - 1:
        raise NotLowerable(f"per-token range [{qmin}, {qmax}] is not a signed int range")
    return args["x"], qmax


def static_source(xq: Any) -> tuple[fx.Node, int, int] | None:
    """(float activation, qmin, qmax) of a static `slimc.quantize_affine`, else None."""
    if not is_call(xq, ops.quantize_affine.default):
        return None
    args = bound_args(xq)
    return args["x"], int(args["qmin"]), int(args["qmax"])


@dataclass(frozen=True)
class KernelCall:
    """The kernel op call that replaces one fused linear: op, arguments, binding."""

    op: Any
    args: tuple[Any, ...]
    binding: KernelBinding


_ACTIVATION_OPS = (
    ops.quantize_per_token.default,
    ops.quantize_affine.default,
    ops.hadamard.default,
)


def erase_unused_activation_ops(program: Program) -> None:
    """Drop activation quantization / rotation nodes (and their getitems) no node reads."""
    for node in reversed(list(program.graph.nodes)):
        if node.users or node.op != "call_function":
            continue
        source = node.args[0] if node.target is operator.getitem else node
        if isinstance(source, fx.Node) and source.target in _ACTIVATION_OPS:
            program.graph.erase_node(node)


@dataclass(frozen=True, kw_only=True)
class LoweringPass(Pass):
    """A FUSED -> KERNEL pass: each fused linear (with its activation quantization) becomes
    the one kernel op `plan` returns, or stays fused when `plan` raises NotLowerable."""

    accepts = frozenset({Stage.FUSED})
    produces = Stage.KERNEL
    exact = False
    cli_role = "lowering"
    device_type: ClassVar[str | None] = None
    """The torch device type (`cpu`, `cuda`, ...) whose graphs the `slimc` torch.compile backend
    lowers with this pass when no pipeline is given (None: only when named)."""
    refusal_level: ClassVar[int] = logging.INFO
    """Log level of a linear left fused."""

    def plan(self, program: Program, node: fx.Node, fused: FusedLinear) -> KernelCall:
        """The kernel call for fused linear `node`, a call of `fused` (e.g. `LINEAR_W8A8`).

        Raises:
            NotLowerable: no kernel of this target takes it.
        """
        raise NotImplementedError

    def refuse(self, program: Program, node: fx.Node, exc: NotLowerable) -> None:
        """A linear stays fused: log it and count it (a subclass may raise instead)."""
        where = node_loc(node) or node.name
        log.log(self.refusal_level, "%s: %s stays fused: %s", self.name, where, exc)
        self.stat(program, "left fused (reference kernels)", 1)

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        lowered = 0
        for node in list(program.graph.nodes):
            fused = fused_linear_kind(node)
            if fused is None:
                continue
            try:
                kernel_call = self.plan(program, node, fused)
            except NotLowerable as exc:
                self.refuse(program, node, exc)
                continue
            new = call(program, kernel_call.op, kernel_call.args, before=node, origin=str(self))
            new.meta[SCHEME_KEY] = node.meta.get(SCHEME_KEY)
            new.meta[KERNEL_KEY] = kernel_call.binding
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
            self.stat(program, f"lowered linears ({kernel_call.binding.kernel})", 1)
            lowered += 1
        if lowered:
            erase_unused_activation_ops(program)
            program.recompile()
        return PassResult(changed=lowered > 0)
