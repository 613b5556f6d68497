"""How LinearGroups finds groups: norm scale carriers and channel-preserving producer paths."""

from __future__ import annotations

import operator
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch
from torch import fx

from slimc.analyses.group_types import (
    CASTS,
    MOVES,
    NORMS,
    SPLITS,
    GroupKind,
    LinearGroup,
    Refusal,
    ScaleCarrier,
    module_of,
    op_name,
    where,
    where_all,
)
from slimc.ir.builder import is_constant, tensor_val

if TYPE_CHECKING:
    from slimc.analyses.linear_groups import LinearGroups

aten = torch.ops.aten


def _users_are(node: fx.Node, allowed: set[fx.Node]) -> bool:
    return all(u in allowed for u in node.users)


def _channel_constant(node: object, channels: int) -> tuple[fx.Node, float] | None:
    """`w` or `w + c` (through casts) where `w` is a constant of `channels` elements."""
    if not isinstance(node, fx.Node):
        return None
    offset = 0.0
    while node.op == "call_function" and node.target in CASTS and len(node.users) == 1:
        node = node.args[0]  # type: ignore[assignment]
    if (
        node.op == "call_function"
        and node.target is aten.add.Tensor
        and isinstance(node.args[1], (int, float))
        and len(node.users) == 1
    ):
        offset = float(node.args[1])
        node = node.args[0]  # type: ignore[assignment]
        while node.op == "call_function" and node.target in CASTS and len(node.users) == 1:
            node = node.args[0]  # type: ignore[assignment]
    if not is_constant(node):
        return None
    shape = tuple(tensor_val(node).shape)
    if not shape or shape[-1] != channels or any(d != 1 for d in shape[:-1]):
        return None
    return node, offset


def norm_linear_group(
    x: fx.Node,
    linears: list[fx.Node],
    result: LinearGroups,
    fan_out: frozenset[fx.Node] = frozenset(),
) -> LinearGroup | None:
    """A norm (or any per-channel multiply by a constant) whose output only these linears read.

    `fan_out`: the row-copying views through which the norm's output also reaches the other
    targets (a MoE block's router reads the tokens, its experts each token once per choice);
    readers among them are allowed."""
    channels = int(tensor_val(linears[0].args[1]).shape[-1])
    chain = [x]
    node = x
    while keeps_channels(node):
        node = node.args[0]  # type: ignore[assignment]
        chain.append(node)
    carrier = scale_carrier(node, channels)
    if carrier is None:
        bare = _weightless_norm(node)
        if bare is not None:
            result.refused.append(
                Refusal(
                    "norm-linear",
                    (module_of(bare), *[module_of(t) for t in linears]),
                    f"the norm has no weight to absorb a scale ({bare_kind(bare)}) and its "
                    "output has no other exact fold",
                )
            )
        return None
    targets = set(linears)
    inner_ok = all(_users_are(n, {chain[i - 1], *fan_out}) for i, n in enumerate(chain) if i > 0)
    if not (_users_are(x, targets | fan_out) and inner_ok):
        others = [u for n in chain for u in n.users if u not in targets and u not in chain]
        result.refused.append(
            Refusal(
                "norm-linear",
                (module_of(carrier.node), *[module_of(t) for t in linears]),
                f"the scaled value is also read by {where_all(others)}",
            )
        )
        return None
    for const in (carrier.weight, carrier.bias):
        if const is not None and len(const.users) != 1:
            result.refused.append(
                Refusal(
                    "norm-linear",
                    (module_of(carrier.node), *[module_of(t) for t in linears]),
                    f"constant {const.target} is shared by {len(const.users)} nodes: "
                    + where_all(const.users),
                )
            )
            return None
    return LinearGroup("norm-linear", x, tuple(linears), carrier=carrier)


def _weightless_norm(node: fx.Node) -> fx.Node | None:
    """A norm with nothing to fold a scale into: `layer_norm`/`rms_norm` without a weight
    (OLMo's non-parametric LayerNorm) or `x * rsqrt(...)` with no per-channel factor after it."""
    if node.op != "call_function":
        return None
    if node.target in NORMS:
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        return node if weight is None else None
    if node.target is aten.mul.Tensor:
        for factor in node.args[:2]:
            f = factor
            while isinstance(f, fx.Node) and f.op == "call_function" and f.target in CASTS:
                f = f.args[0]
            if isinstance(f, fx.Node) and f.target is aten.rsqrt.default:
                return node
    return None


def bare_kind(node: fx.Node) -> str:
    """How a weightless norm was recognised, for its refusal."""
    if node.target in NORMS:
        return f"{op_name(node)} without weight"
    return "x * rsqrt(...) without a per-channel weight"


def keeps_channels(node: fx.Node) -> bool:
    """A cast or move whose output element `[..., c]` comes from input element `[..., c]`.

    Such ops (dtype casts, slices of the sequence, views keeping the last dim, transposes of
    leading dims) sit between a norm and the linears reading it, e.g. the final norm and
    `lm_head` (`hidden_states[:, -n:, :]`); a per-channel scale travels through them unchanged.
    """
    if node.op != "call_function" or node.target not in MOVES:
        return False
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return False
    if node.target in CASTS or node.target is aten.contiguous.default:
        return True
    try:
        out, inp = tensor_val(node), tensor_val(src)
    except TypeError:
        return False
    if out.dim() == 0 or inp.dim() == 0 or out.shape[-1] != inp.shape[-1]:
        return False
    last = inp.dim() - 1
    if node.target is aten.transpose.int:
        dims = {d % inp.dim() for d in node.args[1:3]}  # type: ignore[operator]
        return last not in dims or len(dims) == 1
    if node.target is aten.permute.default:
        return node.args[1][-1] % inp.dim() == last  # type: ignore[index,operator]
    if node.target is aten.slice.Tensor:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        return dim % inp.dim() != last or step == 1  # type: ignore[operator]
    # views, reshapes, (un)squeezes and expands keeping the last dim's size keep its index
    return True


def scale_carrier(node: fx.Node, channels: int) -> ScaleCarrier | None:
    if node.op != "call_function":
        return None
    if node.target in NORMS:
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        bias = None
        if node.target is aten.layer_norm.default:
            bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        if not is_constant(weight) or (bias is not None and not is_constant(bias)):
            return None
        return ScaleCarrier(node, weight, 0.0, bias)  # type: ignore[arg-type]
    if node.target is aten.add.Tensor and len(node.users) >= 1:
        inner, other = node.args[0], node.args[1]
        found = _channel_constant(other, channels)
        if found and found[1] == 0.0 and isinstance(inner, fx.Node) and len(inner.users) == 1:
            base = scale_carrier(inner, channels)
            if base is not None and base.bias is None and base.node.target is aten.mul.Tensor:
                return ScaleCarrier(node, base.weight, base.offset, found[0])
        return None
    if node.target is aten.mul.Tensor:
        for a, b in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            found = _channel_constant(b, channels)
            if found is not None and isinstance(a, fx.Node):
                return ScaleCarrier(node, found[0], found[1])
    return None


def _depends_on(node: object, target: fx.Node, stop: Collection[fx.Node] = ()) -> bool:
    """Whether `node` is computed from `target` other than through the nodes in `stop`.

    Nodes placed before `target` in the graph cannot depend on it and are not searched.
    """
    if not isinstance(node, fx.Node):
        return False
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen or n in stop or n.op != "call_function" or n < target:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


PICKS = frozenset({aten.select.int, aten.narrow.default})
"""Selections besides the moves: `qkv.view(b, s, 3, h, d).select(2, i)` picks one part."""

SELECTS = (MOVES - CASTS) | PICKS
"""Ops whose output elements are some of their input's elements, unchanged: a reader of the
producer through one of them sees only the channels it selects."""


def _side_reads(leaks: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """Split the readers of the producer's values off the path into selections (the q and k
    slices of a fused qkv; a split's parts) and the rest."""
    selections: list[fx.Node] = []
    others: list[fx.Node] = []
    for u in leaks:
        if u.op != "call_function":
            others.append(u)
        elif u.target in SELECTS or (u.target is operator.getitem and _is_split(u.args[0])):
            selections.append(u)
        elif u.target in SPLITS and all(g.target is operator.getitem for g in u.users):
            selections.extend(u.users)
        else:
            others.append(u)
    return selections, others


def path_group(
    x: fx.Node,
    linears: list[fx.Node],
    by_input: dict[fx.Node, list[fx.Node]],
    result: LinearGroups,
) -> LinearGroup | None:
    """Walk back from `x` through channel-preserving ops to the single linear that produces it.

    Other readers of the producer's output are allowed when they only select elements of it
    (the q and k parts of a fused qkv, the gate half of a fused gate_up): the channel probe
    then checks they never read a channel the targets read.
    """
    path: list[fx.Node] = []
    kind: GroupKind = "linear-linear"
    node = x
    while True:
        if node.op != "call_function":
            return None
        if node.target is aten.linear.default and is_constant(node.args[1]):
            break
        path.append(node)
        if node.target in MOVES or node.target in PICKS:
            node = node.args[0]  # type: ignore[assignment]
        elif node.target is aten.mul.Tensor:
            a, b = node.args[0], node.args[1]
            if isinstance(a, fx.Node) and not isinstance(b, fx.Node):
                node = a  # a scalar factor scales every channel alike
                continue
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return None
            # follow the operand that is a linear's output (or leads to one); the other must not
            a_lin, b_lin = _leads_to_linear(a), _leads_to_linear(b)
            if a_lin == b_lin:
                return None
            node, other = (a, b) if a_lin else (b, a)
            if kind == "linear-linear" and not is_constant(other):
                kind = "up-down"  # the producer's output times a gate computed elsewhere
        elif node.target is operator.getitem and _is_split(node.args[0]):
            path.append(node.args[0])  # type: ignore[arg-type]
            node = node.args[0].args[0]  # type: ignore[union-attr]
        elif node.target is aten.scaled_dot_product_attention.default:
            node = node.args[2]  # type: ignore[assignment]
            kind = "ov"
        elif node.target in (aten.matmul.default, aten.bmm.default) and _is_probs(node.args[0]):
            node = node.args[1]  # type: ignore[assignment]
            kind = "ov"
        else:
            return None
        if not isinstance(node, fx.Node):
            return None
    producer = node
    heads = (module_of(producer), *[module_of(t) for t in linears])
    allowed = set(path) | set(linears)
    members = [producer, *path]
    leaks = list(dict.fromkeys(u for n in members for u in n.users if u not in allowed))
    side, others = _side_reads(leaks)
    if others:
        result.refused.append(Refusal(kind, heads, f"values also read by {where_all(others)}"))
        return None
    on_path = set(members)
    for n in path:
        if n.target is aten.mul.Tensor:
            other = n.args[1] if n.args[0] in on_path else n.args[0]
            if _depends_on(other, producer, side):
                result.refused.append(
                    Refusal(
                        kind,
                        heads,
                        f"both factors of {where(n)} depend on the output of {where(producer)}",
                    )
                )
                return None
        scores = ()
        if n.target is aten.scaled_dot_product_attention.default:
            scores = n.args[:2]
        elif n.target in (aten.matmul.default, aten.bmm.default):
            scores = n.args[:1]
        if any(_depends_on(a, producer, side) for a in scores):
            result.refused.append(
                Refusal(
                    kind,
                    heads,
                    f"the attention scores of {where(n)} depend on the values of {where(producer)}",
                )
            )
            return None
    return LinearGroup(
        kind, x, tuple(linears), producer=producer, path=tuple(path), side_reads=tuple(side)
    )


def _is_split(node: object) -> bool:
    return isinstance(node, fx.Node) and node.target in SPLITS


def _leads_to_linear(node: fx.Node) -> bool:
    while node.op == "call_function":
        if node.target in MOVES or node.target in PICKS:
            node = node.args[0]  # type: ignore[assignment]
        elif node.target is operator.getitem and _is_split(node.args[0]):
            node = node.args[0].args[0]  # type: ignore[union-attr,assignment]
        else:
            break
    return node.op == "call_function" and node.target is aten.linear.default


def _is_probs(node: object) -> bool:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in MOVES:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.target in (
        aten.softmax.int,
        aten._softmax.default,
        aten.dropout.default,
    )
