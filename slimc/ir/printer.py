"""Deterministic MLIR-like text form of a program: one node per line, typed, with locations."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from slimc.kernel import binding_of
from slimc.program import node_loc

if TYPE_CHECKING:
    from slimc.program import Program

_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
    torch.float8_e4m3fn: "f8e4m3",
    torch.float8_e5m2: "f8e5m2",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def _dim(d: Any) -> str:
    return str(d) if isinstance(d, int) else str(d).replace(" ", "")


def format_type(val: Any) -> str:
    """`f32[1, s0, 576]` for a tensor, `sym` for a SymInt, a tuple for several results."""
    if isinstance(val, torch.Tensor):
        return f"{dtype_name(val.dtype)}[{', '.join(_dim(d) for d in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_type(v) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return "index"
    if isinstance(val, (torch.SymFloat, float)):
        return "f64"
    if isinstance(val, (torch.SymBool, bool)):
        return "i1"
    if isinstance(val, int):
        return "index"
    if val is None:
        return "none"
    return type(val).__name__


def format_value(value: Any) -> str:
    """A scalar or node argument as printed in an op's argument list."""
    if isinstance(value, fx.Node):
        return f"%{value.name}"
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.namespace, target._schema.name.split("::")[-1]
        overload = target._overloadname
        return f"{ns}.{name}" + ("" if overload == "default" else f".{overload}")
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return f"py.{target.__name__}"
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__qualname__", str(target))


def _is_tensorish(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value)


def _schema_args(node: fx.Node) -> tuple[list[str], list[str]]:
    target = node.target
    assert isinstance(target, torch._ops.OpOverload)
    positional: list[str] = []
    named: list[str] = []
    for i, arg in enumerate(target._schema.arguments):
        if i < len(node.args):
            value, given = node.args[i], True
        elif arg.name in node.kwargs:
            value, given = node.kwargs[arg.name], True
        else:
            value, given = arg.default_value if arg.has_default_value() else None, False
        is_tensor_arg = (
            isinstance(arg.type, (torch.TensorType, torch.OptionalType))
            and ("Tensor" in str(arg.type))
            or "Tensor[]" in str(arg.type)
        )
        if is_tensor_arg or _is_tensorish(value):
            positional.append(format_value(value))
            continue
        if not given or (arg.has_default_value() and value == arg.default_value):
            continue
        named.append(f"{arg.name}={format_value(value)}")
    return positional, named


def format_node(node: fx.Node, loc: bool = True) -> str:
    """One line for one node (placeholders and the output are printed by `print_graph`)."""
    ty = format_type(node.meta.get("val"))
    if node.op == "get_attr":
        text = f'%{node.name} = const "{node.target}" : {ty}'
    elif node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            positional, named = _schema_args(node)
        else:
            positional = [format_value(a) for a in node.args]
            named = [f"{k}={format_value(v)}" for k, v in node.kwargs.items()]
        text = f"%{node.name} = {op_name(node.target)}({', '.join(positional + named)}) : {ty}"
    else:
        args = ", ".join(format_value(a) for a in node.args)
        text = f'%{node.name} = {node.op} "{node.target}"({args}) : {ty}'
    binding = binding_of(node)
    if binding is not None:
        text += f"  {{{binding.format()}}}"
    where = node_loc(node)
    if loc and where:
        text += f'  loc("{where}")'
    return text


def print_graph(
    graph: fx.Graph, name: str = "forward", loc: bool = True, header: Iterable[str] = ()
) -> str:
    """The text form of an FX graph: deterministic, one node per line."""
    lines = list(header)
    params = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = [n for n in graph.nodes if n.op == "output"]
    out_vals = list(fx.node.map_arg(outputs[0].args[0], lambda n: n)) if outputs else []
    flat_out = [v for v in _flatten(out_vals)]
    sig_in = ", ".join(f"%{p.name}: {format_type(p.meta.get('val'))}" for p in params)
    sig_out = ", ".join(
        format_type(v.meta.get("val")) if isinstance(v, fx.Node) else format_type(v)
        for v in flat_out
    )
    lines.append(f"graph @{name}({sig_in}) -> ({sig_out}) {{")
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        lines.append("  " + format_node(node, loc))
    lines.append("  return " + ", ".join(format_value(v) for v in flat_out))
    lines.append("}")
    return "\n".join(lines)


def _flatten(values: Any) -> Iterable[Any]:
    if isinstance(values, (list, tuple)):
        for v in values:
            yield from _flatten(v)
    else:
        yield values


def print_program(program: Program, loc: bool = True) -> str:
    header = [f"// stage: {program.stage.label}"]
    return print_graph(program.graph, loc=loc, header=header)
