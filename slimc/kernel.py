"""Kernel bindings: how a lowering pass records which kernel runs a fused op (the KERNEL stage).

A lowering pass (`lower-cpu`, `lower-triton`, `lower-npu`) replaces each fused quantized linear
(`slimc.linear_*`, with its activation quantization) by ONE call of a kernel op whose first
argument is the float activation and whose other arguments are constants (`get_attr`, possibly
re-laid-out weights) or literals. It records the choice in `node.meta[KERNEL_KEY]` as a
`KernelBinding`; the IR printer shows it, and write-back turns the node into a `KernelLinear`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

KERNEL_KEY = "slimc_kernel"
"""node.meta key of the `KernelBinding` a lowering pass chose for a node."""


@dataclass(frozen=True)
class KernelBinding:
    """One kernel and its static configuration, bound to one node.

    Attributes:
        kernel: a stable, dotted name, e.g. "cpu.int4pack_mm" or "triton.w4a16_gemv".
        config: static launch/config parameters (tile sizes, split-K, ...), printed in the IR.
        reason: why this kernel was chosen (shape rule, measured table), for `--debug` output.
    """

    kernel: str
    config: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""

    def format(self) -> str:
        """`kernel = "name", config = {k = v, ...}`, sorted, as the IR printer shows it."""
        text = f'kernel = "{self.kernel}"'
        if self.config:
            items = ", ".join(f"{k} = {self.config[k]!r}" for k in sorted(self.config))
            text += f", config = {{{items}}}"
        return text


def binding_of(node: Any) -> KernelBinding | None:
    """The binding recorded on an fx node, or None."""
    meta = getattr(node, "meta", None)
    return None if meta is None else meta.get(KERNEL_KEY)


EagerImpl = Callable[..., Any]
_EAGER_IMPLS: dict[str, tuple[str, EagerImpl]] = {}


def register_eager_impl(op_name: str, device_type: str, fn: EagerImpl) -> None:
    """Declare `fn` the plain-Python body of kernel op `op_name` on `device_type` tensors.

    `KernelLinear` calls it directly in eager mode (no dispatcher round trip, which costs tens
    of microseconds per call: as much as a small decode-time linear); tracing, export and
    torch.compile still see the op.
    """
    _EAGER_IMPLS[op_name] = (device_type, fn)


def eager_impl(op_name: str) -> tuple[str, EagerImpl] | None:
    """(device type, body) registered for a kernel op, or None."""
    return _EAGER_IMPLS.get(op_name)
