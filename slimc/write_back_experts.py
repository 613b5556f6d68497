"""Write-back of quantized MoE expert stacks: the experts module becomes a `QuantizedExperts`."""

from __future__ import annotations

from torch import nn

from slimc.errors import UserError
from slimc.expert_forms import EXPERT_STACK_KEY
from slimc.ir.builder import constant_value
from slimc.linear_match import QdqLinear, match_qdq_experts
from slimc.nn import QuantizedExperts, QuantizedLinear
from slimc.ops.packing import pack_int4
from slimc.program import Program, node_loc

_STACKS = ("gate_up_proj", "up_proj", "down_proj")
"""The stacked weights of transformers' experts modules that `QuantizedExperts` runs."""


def quantized_expert_stacks(program: Program) -> dict[str, dict[str, QdqLinear]]:
    """{experts module path: {stack name: its quantized product}} of the program."""
    found: dict[str, dict[str, QdqLinear]] = {}
    for node in program.graph.nodes:
        m = match_qdq_experts(node)
        if m is None:
            continue
        stack = str(node.meta.get(EXPERT_STACK_KEY, ""))
        path, _, name = stack.rpartition(".")
        found.setdefault(path or (node_loc(node) or node.name), {})[name] = m
    return found


def per_expert_linears(program: Program, m: QdqLinear) -> list[QuantizedLinear]:
    """One `QuantizedLinear` per expert, sliced from the product's stacked codes and scales."""
    qweight, scale, zp, bias = (
        constant_value(program, a) for a in (m.qweight, m.w_scale, m.w_zero_point, m.bias)
    )
    assert qweight is not None and scale is not None
    static = m.scheme.activation is not None and not m.scheme.activation.dynamic
    x_scale = constant_value(program, m.x_scale) if static else None
    x_zp = constant_value(program, m.x_zero_point) if static else None
    experts, n, k = qweight.shape
    four_bit = m.scheme.weight.bits == 4
    return [
        QuantizedLinear(
            m.scheme,
            k,
            n,
            pack_int4(qweight[e]) if four_bit else qweight[e].clone(),
            scale[e].clone(),
            None if zp is None else zp[e].clone(),
            None if bias is None else bias[e].clone(),
            None if x_scale is None else x_scale.reshape(-1),
            None if x_zp is None else x_zp.reshape(-1),
        )
        for e in range(experts)
    ]


def write_back_experts(model: nn.Module, program: Program) -> None:
    """Swap each experts module with quantized stacks for a `QuantizedExperts`.

    Raises:
        UserError: the path is not a transformers experts module of `model`, or a quantized
            stack is not one it computes with.
    """
    for path, stacks in quantized_expert_stacks(program).items():
        parent_path, _, leaf = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            module = getattr(parent, leaf)
        except AttributeError:
            module = None
        if isinstance(module, QuantizedExperts):
            module = module.module
        if not isinstance(module, nn.Module) or not hasattr(module, "has_gate"):
            raise UserError(
                f"cannot write back quantized experts {path!r}: not a transformers experts "
                "module of the model"
            )
        unknown = sorted(set(stacks) - set(_STACKS))
        if unknown:
            raise UserError(f"cannot write back quantized experts {path!r}: unknown {unknown}")
        linears = {name: per_expert_linears(program, m) for name, m in stacks.items()}
        setattr(parent, leaf, QuantizedExperts(module, linears))
