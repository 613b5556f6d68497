"""Choosing linears: module-path globs, the float linears and expert products a quantizer can still
take, MoE routers."""

from __future__ import annotations

import fnmatch

import torch
from torch import fx

from slimc.expert_forms import EXPERT_LINEAR, EXPERT_STACK_KEY
from slimc.ir.builder import is_constant, tensor_val
from slimc.program import Program, node_loc

aten = torch.ops.aten


def matches(path: str | None, patterns: tuple[str, ...]) -> bool:
    """True when a module path matches one of the globs, whole or as a dotted suffix."""
    if not path:
        return False
    return any(
        fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, "*." + p) for p in patterns
    )


def float_linears(program: Program) -> list[fx.Node]:
    """`aten.linear` nodes whose weight is still a float constant."""
    return _with_float_weight(program, aten.linear.default, 2)


def float_expert_products(program: Program) -> list[fx.Node]:
    """`slimc::expert_linear` nodes whose stacked weight [E, N, K] is still a float constant."""
    return _with_float_weight(program, EXPERT_LINEAR, 3)


def _with_float_weight(program: Program, target: object, rank: int) -> list[fx.Node]:
    """The `target` nodes whose weight (argument 1) is a float constant of rank `rank`."""
    out = []
    for node in program.graph.find_nodes(op="call_function", target=target):
        w = node.args[1]
        if is_constant(w) and tensor_val(w).is_floating_point() and tensor_val(w).dim() == rank:
            out.append(node)
    return out


def bias_index(linear: fx.Node) -> int:
    """The bias's argument position: `aten.linear`'s, or `slimc::expert_linear`'s (after ids)."""
    return 3 if linear.target is EXPERT_LINEAR else 2


def bias_of(linear: fx.Node) -> object:
    """The bias argument of an `aten.linear` or a `slimc::expert_linear` (None when absent)."""
    at = bias_index(linear)
    return linear.args[at] if len(linear.args) > at else linear.kwargs.get("bias")


def float_products(program: Program) -> list[fx.Node]:
    """Float linears and float expert products, in graph order."""
    chosen = set(float_linears(program)) | set(float_expert_products(program))
    return [n for n in program.graph.nodes if n in chosen]


def product_path(node: fx.Node) -> str | None:
    """The name a linear or an expert product is chosen and reported by: a linear's module path;
    for an expert product, its stacked weight's name (`...mlp.experts.gate_up_proj`), as one
    experts module computes several products."""
    if node.target is EXPERT_LINEAR:
        return node.meta.get(EXPERT_STACK_KEY) or node_loc(node)
    return node_loc(node)


STOPS = (
    aten.linear.default,
    aten.bmm.default,
    aten.mm.default,
    aten.matmul.default,
    EXPERT_LINEAR,
)
"""Ops a router search does not look past: another projection's output is not the router's."""


def moe_routers(program: Program) -> set[fx.Node]:
    """The linears of mixture-of-experts routers: those the choice of experts is computed from
    (the expert ids of `slimc::expert_linear`, the indices that gather the experts' stacked
    weights, or the input of an `aten.topk`) without passing through another projection,
    whatever the scoring in between (softmax, sigmoid, a bias, group-limited top-k,
    sparsemixer)."""
    graph = program.graph
    seeds: list[fx.Node] = []
    for topk in graph.find_nodes(op="call_function", target=aten.topk.default):
        seeds.extend(topk.all_input_nodes)
    for gather in graph.find_nodes(op="call_function", target=aten.index.Tensor):
        source = gather.args[0]
        if is_constant(source) and tensor_val(source).dim() >= 3:  # experts' stacked weights
            seeds.extend(i for i in gather.all_input_nodes if i is not source)
    for experts in graph.find_nodes(op="call_function", target=EXPERT_LINEAR):
        seeds.append(experts.args[2])  # type: ignore[arg-type]
    return routers_of(seeds)


def moe_gates(program: Program) -> set[fx.Node]:
    """The linears of a MoE model that choose or weigh experts rather than compute features: its
    routers, and single-output linears such as Qwen2-MoE's `shared_expert_gate` (a sigmoid
    weight on the shared expert; serving engines keep it unquantized). Empty for dense models."""
    routers = moe_routers(program)
    if not routers:
        return routers
    single = {
        node
        for node in program.graph.find_nodes(op="call_function", target=aten.linear.default)
        if is_constant(node.args[1]) and tensor_val(node.args[1]).shape[0] == 1
    }
    return routers | single


def routers_of(seeds: list[fx.Node]) -> set[fx.Node]:
    """The linears `seeds` are computed from without passing through another projection."""
    seeds = list(seeds)
    found: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    while seeds:
        node = seeds.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target is aten.linear.default:
            found.add(node)
        elif node.target not in STOPS:
            seeds.extend(node.all_input_nodes)
    return found
