"""Write-back of quantized MoE expert stacks: the experts module becomes a `QuantizedExperts`."""

from __future__ import annotations

from torch import nn

from slimc.errors import UserError
from slimc.expert_forms import EXPERT_STACK_KEY
from slimc.linear_match import QdqLinear, match_qdq_experts, qdq_constants
from slimc.nn import QuantizedExperts, QuantizedLinear
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
    """One `QuantizedLinear` per expert, sliced from the product's stacked codes and scales.

    Each expert's tensors are views of the program's stacked constants, not copies: the codes
    of a MoE model are most of its size, and the program keeps the stacks (int4 codes are
    packed into new tensors, the program holding them one per byte)."""
    constants = qdq_constants(program, m)
    stacked = ("qweight", "weight_scale", "weight_zero_point", "bias")  # [E, ...]; ranges shared
    qweight = constants["qweight"]
    assert qweight is not None
    return [
        QuantizedLinear.from_codes(
            m.scheme,
            **{
                name: t[e] if name in stacked and t is not None else t
                for name, t in constants.items()
            },
        )
        for e in range(qweight.shape[0])
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
