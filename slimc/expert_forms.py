"""Recognise mixture-of-experts dispatch in exported graphs and rewrite it to `slimc::expert_linear`.

transformers' `batched_mm` experts gather each (token, chosen expert) pair's weight matrix from
the experts' stacked weights and multiply row by row:

* `squeeze(bmm(index(W, [ids]), unsqueeze(x, -1)), -1)` with `W` [E, out, in];
* `squeeze(bmm(unsqueeze(x, 1), index(W, [ids])), 1)` with `W` stored [E, in, out] (gpt-oss);
* either followed by `add(., index(b, [ids]))` (or its in-place `add_`) for experts with a bias.

The gather copies one weight matrix per routed token (tens of GB per sample at 30B sizes). The
canonical form, `expert_linear(x, W[E, out, in], ids, b)`, names the experts' weights as one
constant each pass can read and rewrite, and runs each expert's rows as one linear. A weight
stored [E, in, out] is transposed in the program and listed under `TRANSPOSED_WEIGHTS_KEY`, as
`slimc.linear_forms` does for [in, out] linears.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc:: ops)
from slimc.ir.builder import call, is_constant
from slimc.linear_forms import TRANSPOSED_WEIGHTS_KEY, transpose_constant
from slimc.program import Program, node_loc

aten = torch.ops.aten
EXPERT_LINEAR = torch.ops.slimc.expert_linear.default
ROW_COPIES = frozenset(
    {
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.repeat_interleave.self_int,
        aten.contiguous.default,
        aten.clone.default,
    }
)
"""Ops that regroup or copy whole rows (a token's per-choice copies feeding its experts): every
channel keeps its values and its position."""
EXPERT_STACK_KEY = "expert_stack"
"""`node.meta` key of an `expert_linear`: the name of its stacked weight in the model
(`model.layers.0.mlp.experts.down_proj`), kept when a pass replaces the weight argument."""


@dataclass
class ExpertForm:
    """One recognised expert product: `result`'s value is `expert_linear(x, weight, ids, bias)`."""

    result: fx.Node
    core: fx.Node  # the bmm
    x: fx.Node
    weight: fx.Node  # a get_attr constant [E, out, in], or [E, in, out] when stored_transposed
    ids: fx.Node
    bias: fx.Node | None
    stored_transposed: bool


def source_of(node: fx.Node) -> fx.Node:
    """`node` before reshapes and the per-expert row copies (`ROW_COPIES`)."""
    while node.op == "call_function" and node.target in ROW_COPIES:
        node = node.args[0]  # type: ignore[assignment]
    return node


def _val(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _gathered(node: object, dim: int) -> tuple[fx.Node, fx.Node] | None:
    """(constant, ids) when `node` is `index(constant of rank `dim`, [ids])` with 1-D ids."""
    if not _is(node, aten.index.Tensor):
        return None
    source, indices = node.args[0], node.args[1]
    if not is_constant(source) or not isinstance(indices, (list, tuple)) or len(indices) != 1:
        return None
    ids, val = indices[0], _val(source)
    if val is None or val.dim() != dim or not val.is_floating_point() or _val(ids) is None:
        return None
    return (source, ids) if _val(ids).dim() == 1 else None  # type: ignore[union-attr]


def _dim_is(node: fx.Node, dim: int, rank: int) -> bool:
    """Whether an unsqueeze / squeeze node acts on `dim` of a rank-`rank` tensor."""
    arg = node.args[1]
    dims = arg if isinstance(arg, (list, tuple)) else [arg]
    return len(dims) == 1 and int(dims[0]) % rank == dim


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def match_expert_product(bmm: fx.Node) -> ExpertForm | None:
    """The expert product `bmm` computes, or None."""
    if not _is(bmm, aten.bmm.default):
        return None
    left, right = bmm.args[0], bmm.args[1]
    if (found := _gathered(left, 3)) is not None and _is(right, aten.unsqueeze.default):
        unsqueezed, transposed, out_dim = right, False, 2  # W [E, N, K] @ x[:, :, None]
    elif (found := _gathered(right, 3)) is not None and _is(left, aten.unsqueeze.default):
        unsqueezed, transposed, out_dim = left, True, 1  # x[:, None, :] @ W [E, K, N]
    else:
        return None
    weight, ids = found
    if not _dim_is(unsqueezed, out_dim, 3):  # type: ignore[arg-type]
        return None
    x = unsqueezed.args[0]  # type: ignore[union-attr]
    squeeze = _sole_user(bmm)
    x_val, w_val = _val(x), _val(weight)
    if x_val is None or w_val is None or x_val.dim() != 2 or x_val.dtype != w_val.dtype:
        return None
    if squeeze is None or not _is(squeeze, aten.squeeze.dim, aten.squeeze.dims):
        return None
    if not _dim_is(squeeze, out_dim, 3):
        return None
    result, bias = squeeze, None
    add = _sole_user(squeeze)
    plain = add is not None and len(add.args) == 2 and not add.kwargs
    in_place = plain and _is(add, aten.add_.Tensor) and add.args[0] is squeeze  # type: ignore[union-attr]
    if plain and (_is(add, aten.add.Tensor) or in_place):
        other = add.args[1] if add.args[0] is squeeze else add.args[0]  # type: ignore[union-attr]
        gathered_bias = _gathered(other, 2)
        if gathered_bias is not None and gathered_bias[1] is ids:
            result, bias = add, gathered_bias[0]
    return ExpertForm(result, bmm, x, weight, ids, bias, transposed)  # type: ignore[arg-type]


def canonicalize_experts(program: Program) -> int:
    """Rewrite every recognised expert product to `slimc::expert_linear`; the count rewritten.

    A weight stored [E, in, out] is transposed only when recognised products are its only
    readers; otherwise its products stay as they are.
    """
    forms = [m for node in list(program.graph.nodes) if (m := match_expert_product(node))]
    readers: dict[fx.Node, list[ExpertForm]] = {}
    for m in forms:
        readers.setdefault(m.weight, []).append(m)
    transposed: list[str] = list(program.metadata.get(TRANSPOSED_WEIGHTS_KEY, ()))
    count = 0
    for weight, found in readers.items():
        gathers = {m.core.args[1] if m.stored_transposed else m.core.args[0] for m in found}
        if any(m.stored_transposed for m in found):
            only_products = all(set(g.users) <= {m.core for m in found} for g in gathers)
            if not all(m.stored_transposed for m in found) or set(weight.users) != gathers:
                continue
            if not only_products:
                continue
            transpose_constant(program, weight, transposed)
        for m in found:
            _rewrite(program, m)
            count += 1
    if transposed:
        program.metadata[TRANSPOSED_WEIGHTS_KEY] = transposed
    return count


def _rewrite(program: Program, m: ExpertForm) -> None:
    node = call(
        program,
        EXPERT_LINEAR,
        (m.x, m.weight, m.ids, m.bias),
        before=m.result,
        loc=node_loc(m.core),
    )
    node._rename("expert_linear")
    node.meta[EXPERT_STACK_KEY] = str(m.weight.target)
    for key in ("nn_module_stack", "stack_trace"):
        if key in m.core.meta:
            node.meta[key] = m.core.meta[key]
    m.result.replace_all_uses_with(node)
    if m.result.target is aten.add_.Tensor:  # in place on the product: dead, but impure to fx
        program.graph.erase_node(m.result)
