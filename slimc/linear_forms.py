"""Recognise linears by what they compute (matmul / mm / addmm on a constant weight) and rewrite
them to the canonical `aten.linear(x, weight[out, in], bias)` that passes pattern-match on.

Forms found in exported graphs:
* `matmul(x, W.T)` (+ `add(., b)`): `FalconLinear`, hand-written `x @ self.weight.T + self.bias`.
* `view(addmm(b, view(x, [-1, in]), W), [..., out])`: GPT-2's `Conv1D`, weight stored [in, out].
* `mm(x, W)`, `addmm(b, x, W)` on 2-D inputs, with W stored [in, out] or as a transposed view.

A weight stored [in, out] is replaced in the program by its transpose, and its name is listed in
`program.metadata[TRANSPOSED_WEIGHTS_KEY]` so that write-back stores results in the module's own
layout. The module paths of the rewritten linears go to `RECOGNIZED_LINEARS_KEY` (path -> form).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from slimc.ir.builder import call, is_constant
from slimc.program import Program, node_loc

log = logging.getLogger(__name__)
aten = torch.ops.aten

TRANSPOSED_WEIGHTS_KEY = "transposed_weights"
"""`program.metadata` key: names of constants the program holds transposed from the model's."""

RECOGNIZED_LINEARS_KEY = "recognized_linears"
"""`program.metadata` key: {module path: form} of linears rewritten from matmul / addmm forms."""

_FLAT_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclass
class LinearForm:
    """One recognised linear: `out = x @ weight^T + bias` replaces the value of `result`."""

    result: fx.Node  # the node whose uses the new linear takes over
    core: fx.Node  # the matmul / mm / addmm
    x: fx.Node
    weight: fx.Node  # a get_attr constant
    stored_transposed: bool  # the constant is [in, out]: the canonical weight is its transpose
    bias: fx.Node | None
    form: str


def _val(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _dims(val: torch.Tensor) -> list[str]:
    return [str(d) for d in val.shape]


def _is_2d_swap(node: fx.Node) -> bool:
    """Whether `node` swaps the two dims of a 2-D tensor (t, numpy_T, transpose, permute)."""
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target is aten.transpose.int:
        dims = {int(d) % 2 for d in node.args[1:3]}
        return dims == {0, 1}
    if node.target is aten.permute.default:
        return [int(d) % 2 for d in node.args[1]] == [1, 0]
    return False


def _weight_operand(node: object) -> tuple[fx.Node, bool] | None:
    """The constant behind the right operand of `x @ B` and whether it is stored [in, out]."""
    if not isinstance(node, fx.Node):
        return None
    if is_constant(node):
        const, stored_transposed = node, True
    elif node.op == "call_function" and _is_2d_swap(node) and is_constant(node.args[0]):
        const, stored_transposed = node.args[0], False
    else:
        return None
    val = _val(const)
    if val is None or val.dim() != 2 or not val.is_floating_point():
        return None
    return const, stored_transposed


def _bias_constant(node: object, out_features: int) -> fx.Node | None:
    val = _val(node)
    if not is_constant(node) or val is None or val.dim() != 1 or val.shape[0] != out_features:
        return None
    return node  # type: ignore[return-value]


def _unit_scalars(node: fx.Node) -> bool:
    return node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _unflatten(core: fx.Node, x2d: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(x, result) when `core` reads `view(x, [-1, in])` and its one user views it back."""
    if x2d.op != "call_function" or x2d.target not in _FLAT_VIEWS:
        return None
    x, x_val, out_val = x2d.args[0], _val(x2d.args[0]), _val(core)
    user = _sole_user(core)
    if not isinstance(x, fx.Node) or x_val is None or out_val is None or user is None:
        return None
    if user.op != "call_function" or user.target not in _FLAT_VIEWS or user.args[0] is not core:
        return None
    user_val, flat_val = _val(user), _val(x2d)
    if user_val is None or flat_val is None or x_val.dim() < 2:
        return None
    if str(flat_val.shape[-1]) != str(x_val.shape[-1]):  # not a flattening of the leading dims
        return None
    want = _dims(x_val)[:-1] + [str(out_val.shape[-1])]
    return (x, user) if _dims(user_val) == want else None


def match_linear(node: fx.Node) -> LinearForm | None:
    """The linear `node` (a matmul, mm or addmm) computes, or None."""
    if node.op != "call_function":
        return None
    if node.target is aten.matmul.default:
        x, b, bias, form = node.args[0], node.args[1], None, "matmul"
        if _val(x) is None or _val(x).dim() < 1:  # type: ignore[union-attr]
            return None
    elif node.target is aten.mm.default:
        x, b, bias, form = node.args[0], node.args[1], None, "mm"
    elif node.target is aten.addmm.default and _unit_scalars(node):
        bias_arg, x, b, form = node.args[0], node.args[1], node.args[2], "addmm"
        bias = _bias_constant(bias_arg, int(_val(b).shape[-1])) if _val(b) is not None else None
        if bias is None:
            return None
    else:
        return None
    operand = _weight_operand(b)
    x_val, out_val = _val(x), _val(node)
    if operand is None or not isinstance(x, fx.Node) or x_val is None or out_val is None:
        return None
    weight, stored_transposed = operand
    w_val = _val(weight)
    if not x_val.is_floating_point() or w_val is None or x_val.dtype != w_val.dtype:
        return None
    result = node
    if node.target is not aten.matmul.default and (unflat := _unflatten(node, x)) is not None:
        x, result = unflat
        form += "+view"
    if bias is None and (add := _sole_user(result)) is not None:
        plain_add = add.target is aten.add.Tensor and len(add.args) == 2 and not add.kwargs
        if add.op == "call_function" and plain_add:
            other = add.args[1] if add.args[0] is result else add.args[0]
            bias = _bias_constant(other, int(out_val.shape[-1]))
            if bias is not None and _val(bias).dtype == out_val.dtype:  # type: ignore[union-attr]
                result, form = add, form + "+add"
            else:
                bias = None
    return LinearForm(result, node, x, weight, stored_transposed, bias, form)


def _owns_weight(m: LinearForm) -> bool:
    """Whether the module the product was traced in holds the weight (`path.weight`): only then
    is it a layer write-back can replace (not, say, logits from the embedding matrix)."""
    path = node_loc(m.core)
    return path is not None and str(m.weight.target).rpartition(".")[0] == path


def canonicalize_linears(program: Program) -> int:
    """Rewrite every recognised matmul / mm / addmm linear to `aten.linear`; the count rewritten.

    Only products traced inside the module that holds the weight are rewritten. A weight stored
    [in, out] that is also read by anything but recognised linears is left as it is (its
    linears stay in their matmul form, logged): transposing it would change the others.
    """
    graph = program.graph
    found = [
        m
        for node in list(graph.nodes)
        if (m := match_linear(node)) is not None and _owns_weight(m)
    ]
    readers: dict[fx.Node, list[LinearForm]] = {}
    for m in found:
        readers.setdefault(m.weight, []).append(m)
    transposed: list[str] = list(program.metadata.get(TRANSPOSED_WEIGHTS_KEY, ()))
    recognized: dict[str, str] = dict(program.metadata.get(RECOGNIZED_LINEARS_KEY, {}))
    count = 0
    for weight, forms in readers.items():
        stored_transposed = {m.stored_transposed for m in forms}
        if True in stored_transposed:
            if len(stored_transposed) > 1 or set(weight.users) != {m.core for m in forms}:
                log.info(
                    "%s is read as [in, out] by %s and also otherwise: left in matmul form",
                    weight.target,
                    ", ".join(node_loc(m.core) or m.core.name for m in forms),
                )
                continue
            transpose_constant(program, weight, transposed)
        for m in forms:
            _rewrite(program, m)
            recognized[node_loc(m.core) or m.core.name] = m.form
            count += 1
    if transposed:
        program.metadata[TRANSPOSED_WEIGHTS_KEY] = transposed
    if recognized:
        program.metadata[RECOGNIZED_LINEARS_KEY] = recognized
    return count


def transpose_constant(program: Program, weight: fx.Node, transposed: list[str]) -> None:
    """Hold constant `weight` with its last two dims swapped, and list it in `transposed` (the
    names write-back swaps back into the model's layout)."""
    target = str(weight.target)
    program.weights.set(target, program.weights.get(target).transpose(-2, -1).contiguous())
    weight.meta["val"] = program.fake(program.weights.get(target))
    if target not in transposed:
        transposed.append(target)


def _rewrite(program: Program, m: LinearForm) -> None:
    linear = call(
        program,
        aten.linear.default,
        (m.x, m.weight, m.bias),
        before=m.result,
        loc=node_loc(m.core),
    )
    linear._rename("linear")  # not `linear_default`: named like the linears export emits
    for key in ("nn_module_stack", "stack_trace"):
        if key in m.core.meta:
            linear.meta[key] = m.core.meta[key]
    m.result.replace_all_uses_with(linear)
