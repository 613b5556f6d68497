"""One description of each fused op (name, arguments by role, which are weights, the scheme it
serves) and by-name access to the arguments of a call in an fx graph."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from slimc.ops import linear, quant  # noqa: F401  (registers the ops described here)

if TYPE_CHECKING:
    from slimc.quant.scheme import LinearQuantScheme

__all__ = [
    "FUSED_LINEARS",
    "FUSED_OP_NAMES",
    "LINEAR_W4A8",
    "LINEAR_W4A16",
    "LINEAR_W8A8",
    "LINEAR_W8A16",
    "FusedLinear",
    "LinearArgs",
    "bound_args",
    "fused_linear_for",
    "fused_linear_kind",
    "schema_of",
]


def schema_of(target: Any) -> torch.FunctionSchema | None:
    """The schema of an op overload, or of an op packet's `default` overload; else None."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = getattr(target, "default", None)
    if isinstance(target, torch._ops.OpOverload):
        return target._schema
    return None


def bound_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of an op call by their schema names, defaults filled in.

    Raises:
        TypeError: `node` does not call an op with a schema, or an argument it needs is missing.
    """
    schema = schema_of(node.target) if node.op == "call_function" else None
    if schema is None:
        raise TypeError(f"node {node.name} does not call an op with a schema")
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            raise TypeError(f"node {node.name}: argument {arg.name!r} of {schema.name} is missing")
    return out


@dataclass(frozen=True)
class LinearArgs:
    """The arguments of a fused linear call by role (the same names for every fused linear).

    A role the op does not take reads as its default here (no zero point, group -1, ...).
    """

    input: Any
    weight: Any
    weight_scale: Any
    weight_zero_point: Any = None
    bias: Any = None
    group_size: int = -1
    input_scale: Any = None
    input_zero_point: Any = None
    out_dtype: torch.dtype | None = None


_ROLES = tuple(f.name for f in fields(LinearArgs))
_WEIGHT_ROLES = ("weight", "weight_scale", "weight_zero_point", "bias")


@dataclass(frozen=True)
class FusedLinear:
    """One fused quantized linear op: its name, the schema argument of each role, its weights.

    `arg_of` maps a `LinearArgs` role to the op's schema argument name; every name is checked
    against the registered schema when the description is made, so the two cannot drift.
    """

    name: str
    weight_bits: int
    quantized_input: bool
    """The op takes integer activation codes (`xq`), made by an activation quantization."""
    arg_of: Mapping[str, str] = field(repr=False)
    arg_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """The op's argument names, in schema order (read from the registered schema)."""

    def __post_init__(self) -> None:
        names = tuple(a.name for a in self.op._schema.arguments)
        object.__setattr__(self, "arg_names", names)
        for role, arg in self.arg_of.items():
            if role not in _ROLES or arg not in names:
                raise TypeError(f"slimc::{self.name}: no argument {arg!r} for role {role!r}")

    @property
    def packet(self) -> Any:
        """`torch.ops.slimc.<name>` (the op packet)."""
        return getattr(torch.ops.slimc, self.name)

    @property
    def op(self) -> torch._ops.OpOverload:
        """`torch.ops.slimc.<name>.default`, the overload graphs call."""
        return self.packet.default

    @property
    def weights(self) -> tuple[str, ...]:
        """Schema names of the arguments that are constants (weight, its qparams, bias)."""
        return tuple(self.arg_of[r] for r in _WEIGHT_ROLES if r in self.arg_of)

    def read(self, node: fx.Node) -> LinearArgs:
        """The arguments of a call of this op by role."""
        named = bound_args(node)
        return LinearArgs(**{role: named[arg] for role, arg in self.arg_of.items()})

    def call_args(self, args: LinearArgs) -> tuple[Any, ...]:
        """Positional arguments of a call of this op, in schema order.

        Raises:
            ValueError: `args` sets a role the op does not take.
        """
        for role in _ROLES:
            value = getattr(args, role)
            unset = value is None or (role == "group_size" and value == -1)
            if role not in self.arg_of and not unset:
                raise ValueError(f"slimc::{self.name} takes no {role}")
        by_name = {arg: getattr(args, role) for role, arg in self.arg_of.items()}
        return tuple(by_name[name] for name in self.arg_names)


def _weight_only(name: str, bits: int) -> FusedLinear:
    roles = dict(
        input="x",
        weight="qweight",
        weight_scale="scale",
        weight_zero_point="zero_point",
        group_size="group_size",
        bias="bias",
    )
    return FusedLinear(name, bits, False, roles)


LINEAR_W8A16 = _weight_only("linear_w8a16", 8)
LINEAR_W4A16 = _weight_only("linear_w4a16", 4)
LINEAR_W8A8 = FusedLinear(
    "linear_w8a8",
    8,
    True,
    dict(
        input="xq",
        input_scale="x_scale",
        input_zero_point="x_zero_point",
        weight="qweight",
        weight_scale="w_scale",
        bias="bias",
        out_dtype="out_dtype",
    ),
)
LINEAR_W4A8 = FusedLinear(
    "linear_w4a8",
    4,
    True,
    dict(
        input="xq",
        input_scale="x_scale",
        weight="qweight",
        weight_scale="w_scale",
        bias="bias",
        out_dtype="out_dtype",
    ),
)

FUSED_LINEARS: dict[str, FusedLinear] = {
    d.name: d for d in (LINEAR_W8A8, LINEAR_W8A16, LINEAR_W4A16, LINEAR_W4A8)
}
"""The fused quantized linear ops fuse-quantized-linear emits, by name."""

FUSED_OP_NAMES = frozenset({*FUSED_LINEARS, "quantize_per_token"})
"""Every op of the fused stage: the fused linears and the dynamic activation quantization."""


def fused_linear_for(scheme: LinearQuantScheme) -> FusedLinear:
    """The fused linear that computes a linear of `scheme`.

    Weight-only schemes take `linear_w{4,8}a16`; dynamic activations with 4-bit weights take
    `linear_w4a8`; every other activation scheme takes `linear_w8a8`.
    """
    wbits, act = scheme.weight.bits, scheme.activation
    if act is None:
        return LINEAR_W4A16 if wbits == 4 else LINEAR_W8A16
    if act.dynamic and wbits == 4:
        return LINEAR_W4A8
    return LINEAR_W8A8


def fused_linear_kind(node: fx.Node) -> FusedLinear | None:
    """The description of the fused linear `node` calls (an overload or an op packet), else None."""
    if node.op != "call_function":
        return None
    schema = schema_of(node.target)
    if schema is None:
        return None
    namespace, _, name = schema.name.partition("::")
    return FUSED_LINEARS.get(name) if namespace == "slimc" else None
