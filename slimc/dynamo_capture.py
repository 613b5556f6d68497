"""Turn a Dynamo graph (what a torch.compile backend receives) into a canonical slimc Program."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx.traceback as fx_traceback
from torch import fx, nn
from torch.export import Dim

from slimc.canonical import canonicalize
from slimc.capture import capture
from slimc.errors import UserError
from slimc.ir.verifier import FLOAT_OPS, QDQ_OPS
from slimc.ops.fused import FUSED_OP_NAMES
from slimc.program import LOC_KEY, Program
from slimc.stage import Stage

log = logging.getLogger(__name__)

_CONTAINERS = frozenset({"_modules", "_parameters", "_buffers"})
_TOKEN = re.compile(
    r"\[\s*'(?P<key>[^']*)'\s*\]|\[\s*\"(?P<dkey>[^\"]*)\"\s*\]|\[\s*(?P<index>-?\d+)\s*\]"
    r"|\.?(?P<attr>[A-Za-z_]\w*|\d+)"
)


class DynamoCaptureError(UserError):
    """A Dynamo graph the backend cannot turn into a Program (the message says why)."""


def _parse(text: str) -> tuple[str | None, list[str]] | None:
    """(root, parts) of a Dynamo source or module path: `L['self'].fc1` -> ("self", ["fc1"]).

    Positional indices right after the variable belong to the root: `L['args'][0].fc1` (a
    forward wrapped in a `*args` decorator) -> ("args.0", ["fc1"]).
    """
    parts: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            return None
        kind = m.lastgroup or "attr"
        parts.append((kind, m.group(kind)))
        pos = m.end()
    root = None
    if len(parts) >= 2 and parts[0] in (("attr", "L"), ("attr", "G")) and parts[1][0] != "attr":
        root, parts = parts[1][1], parts[2:]
        while parts and parts[0][0] == "index":
            root, parts = f"{root}.{parts[0][1]}", parts[1:]
    return root, [v for _, v in parts if v not in _CONTAINERS]


def source_root(text: str) -> str | None:
    """The frame variable (`self` in `L['self'].fc1`) a Dynamo source or module path starts at."""
    parsed = _parse(text)
    return None if parsed is None else parsed[0]


def dotted_path(text: str, module_root: str | None = None) -> str | None:
    """`model.layers.0.q_proj` for a Dynamo source or module path, or None for other forms.

    Accepts `L['self']._modules['model']._modules['layers']._modules['0']`,
    `L['self'].model.layers[0]` and `G['model'].fc1`; the root variable is dropped when it is
    `module_root` (the compiled module) and kept as the first component otherwise.
    """
    parsed = _parse(text)
    if parsed is None:
        return None
    root, parts = parsed
    if root is not None and root != module_root:
        parts = [root, *parts]
    return ".".join(parts)


def module_root(
    gm: fx.GraphModule, weight_sources: Sequence[str], input_sources: Sequence[str]
) -> str | None:
    """The variable all weights and module paths hang off (the compiled module), if there is one.

    Names are made relative to it, as `slimc.capture` names them relative to the model. Module
    paths of globals (`G[...]`: functions that transformers wraps as layers) are not evidence.
    """
    paths = [
        str(entry[0])
        for n in gm.graph.nodes
        for entry in (n.meta.get("nn_module_stack") or {}).values()
        if str(entry[0]).startswith("L[")
    ]
    roots = {source_root(t) for t in [*weight_sources, *paths]}
    if len(roots) != 1 or None in roots:
        return None
    (root,) = roots
    return None if root in {source_root(t) for t in input_sources} else root


# -- what each graph input is ----------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """One input of the Dynamo graph: an activation, a weight, or a size of an activation.

    Attributes:
        kind: "input" (passed through at run time), "const" (a parameter or buffer, frozen into
            the program as a constant named `name`), "size" (a symbolic size, read from dim
            `dim` of activation slot `of`).
        name: the placeholder name (input) or the constant's dotted name (const).
    """

    kind: Literal["input", "const", "size"]
    name: str
    of: int = -1
    dim: int = -1


def _source_name(node: fx.Node) -> str | None:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    return None if source is None else str(source.name)


def _is_weight(node: fx.Node, source: str | None, example: Any) -> bool:
    if isinstance(example, nn.Parameter):
        return True
    if "_dynamo_static_input_type" in (node.meta.get("tensor_dict") or {}):
        return True
    return source is not None and any(f".{c}[" in source for c in ("_parameters", "_buffers"))


def _input_name(source: str | None, fallback: str) -> str:
    path = dotted_path(source) if source else None
    parts = path.split(".") if path else []
    name = parts[-1] if parts and parts[-1].isidentifier() else "_".join(parts)
    name = re.sub(r"\W", "_", name)
    return name if name and not name[0].isdigit() else fallback


def _const_name(source: str | None, fallback: str, root: str | None) -> str:
    path = dotted_path(source, root) if source else None
    if not path:
        return fallback
    parts = [
        p if p.isidentifier() or p.isdigit() else re.sub(r"\W", "_", p) for p in path.split(".")
    ]
    return ".".join(p or "_" for p in parts)


def plan_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list[Slot], str | None]:
    """Classify every placeholder of a Dynamo graph (see `Slot`); also return the module root.

    Raises:
        DynamoCaptureError: a non-tensor input, or a symbolic integer input that is not the size
            of an activation (baking it in would be wrong for other values).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise DynamoCaptureError(
            f"the graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs"
        )
    kinds: list[str] = []
    for node, example in zip(placeholders, example_inputs, strict=True):
        if isinstance(example, torch.Tensor):
            kinds.append("const" if _is_weight(node, _source_name(node), example) else "input")
        elif isinstance(example, (int, torch.SymInt)) and isinstance(
            node.meta.get("example_value"), torch.SymInt
        ):
            kinds.append("size")  # resolved once every activation is known
        else:
            raise DynamoCaptureError(
                f"graph input {node.name} is a {type(example).__name__}, not a tensor"
            )
    sources = [_source_name(n) or "" for n in placeholders]
    root = module_root(
        gm,
        [t for t, k in zip(sources, kinds, strict=True) if k == "const"],
        [t for t, k in zip(sources, kinds, strict=True) if k == "input"],
    )
    slots: list[Slot | None] = [
        Slot("const", _const_name(src, n.name, root))
        if kind == "const"
        else Slot("input", _input_name(src, n.name))
        if kind == "input"
        else None
        for n, src, kind in zip(placeholders, sources, kinds, strict=True)
    ]
    resolved = [
        slot if slot is not None else _size_slot(placeholders, slots, node)
        for node, slot in zip(placeholders, slots, strict=True)
    ]
    return resolved, root


def _size_slot(placeholders: list[fx.Node], slots: list[Slot | None], node: fx.Node) -> Slot:
    """The activation dim a symbolic integer input stands for (Dynamo passes sizes separately)."""
    want = str(node.meta["example_value"].node.expr)
    for i, (other, slot) in enumerate(zip(placeholders, slots, strict=True)):
        fake = other.meta.get("example_value")
        if slot is None or slot.kind != "input" or not isinstance(fake, torch.Tensor):
            continue
        for d, size in enumerate(fake.shape):
            if isinstance(size, torch.SymInt) and str(size.node.expr) == want:
                return Slot("size", node.name, i, d)
    raise DynamoCaptureError(
        f"graph input {node.name} is a symbolic integer that is no activation size"
    )


# -- replaying the graph under torch.export ---------------------------------------------------
class DynamoGraph(nn.Module):
    """A Dynamo graph as a module whose forward takes only the activations; weights are buffers.

    Exporting this module gives the graph in the same form `slimc.capture` gives the model. (Any
    tensor the graph reads with `get_attr` instead of as an input is exported as a constant too.)
    """

    def __init__(
        self, gm: fx.GraphModule, slots: list[Slot], example_inputs: Sequence[Any]
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_slimc_gm", gm)  # not a submodule: its state is not ours
        object.__setattr__(self, "_slimc_slots", slots)
        for slot, value in zip(slots, example_inputs, strict=True):
            if slot.kind == "const":
                _register(self, slot.name, value)

    def forward(self, *inputs: torch.Tensor) -> Any:
        slots: list[Slot] = self._slimc_slots  # type: ignore[assignment]
        given = iter(inputs)
        values: list[Any] = [
            next(given)
            if s.kind == "input"
            else self.get_buffer(s.name)
            if s.kind == "const"
            else None
            for s in slots
        ]
        for i, slot in enumerate(slots):
            if slot.kind == "size":
                values[i] = values[slot.of].shape[slot.dim]
        gm: fx.GraphModule = self._slimc_gm  # type: ignore[assignment]
        with fx_traceback.preserve_node_meta():  # keep Dynamo's nn_module_stack on every node
            return fx.Interpreter(gm).run(*values)


def _register(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    *parents, leaf = name.split(".")
    mod = owner
    for part in parents:
        if not isinstance(getattr(mod, part, None), nn.Module):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    mod.register_buffer(leaf, value.detach())


def _dynamic_shapes(
    gm: fx.GraphModule, slots: list[Slot]
) -> tuple[tuple[dict[int, Any] | None, ...]] | None:
    """Export dims: dynamic where Dynamo's example value has a symbolic size, else static."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs: list[dict[int, Any] | None] = []
    for node, slot in zip(placeholders, slots, strict=True):
        if slot.kind != "input":
            continue
        fake = node.meta.get("example_value")
        dims = {
            d: Dim.AUTO
            for d, size in enumerate(getattr(fake, "shape", ()))
            if isinstance(size, torch.SymInt)
        }
        specs.append(dims or None)
    return (tuple(specs),) if any(specs) else None


# -- the program -------------------------------------------------------------------------------
def program_from_dynamo(
    gm: fx.GraphModule, example_inputs: Sequence[Any]
) -> tuple[Program, list[int]]:
    """Export a Dynamo graph with its weights as constants, find its stage, canonicalize it.

    Returns the Program (inputs named as in the user's code, module paths as locations) and the
    positions of the Dynamo graph inputs the
    program takes, in order.

    Raises:
        DynamoCaptureError: an input the program cannot take (see `plan_inputs`).
        UserError: torch.export fails on the graph.
    """
    slots, root = plan_inputs(gm, example_inputs)
    _keep_module_entries_under(gm, root)
    positions = [i for i, s in enumerate(slots) if s.kind == "input"]
    module = DynamoGraph(gm, slots, example_inputs)
    activations = [example_inputs[i] for i in positions]
    # outside Dynamo's tracing context: export must not add guards to Dynamo's shape env, and
    # the program's fake mode must be export's, not Dynamo's
    with torch._guards.tracing(None):
        program = capture(
            module, activations, dynamic_shapes=_dynamic_shapes(gm, slots), canonicalize=False
        )
        _rename_inputs(program, [slots[i].name for i in positions])
        _normalize_locations(program, root)
        program.stage = infer_stage(program.graph)
        canonicalize(program)
    program.metadata["source"] = "torch.compile"
    return program, positions


def _rename_inputs(program: Program, names: list[str]) -> None:
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, names, strict=True):
        if node.name != name:
            node._rename(name)
            node.target = node.name
    program.graph_module.recompile()


def _keep_module_entries_under(gm: fx.GraphModule, root: str | None) -> None:
    """Drop `nn_module_stack` entries outside the compiled module (a global that transformers
    wraps as a layer, such as `apply_rotary_pos_emb`): a location names one of its modules."""
    if root is None:
        return
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: entry for key, entry in stack.items() if source_root(str(entry[0])) == root
            }


def _normalize_locations(program: Program, root: str | None) -> None:
    """Module paths as the user's model names them (`fc1`, not Dynamo's `L['self'].fc1`)."""
    for node in program.graph.nodes:
        raw = node.meta.get(LOC_KEY)
        if raw is None:
            continue
        path = dotted_path(raw, root)
        if path:
            node.meta[LOC_KEY] = path
        elif path == "":
            del node.meta[LOC_KEY]


def slimc_op_name(node: fx.Node) -> str | None:
    """`linear_w8a8` for a `slimc::linear_w8a8` call (an overload or a Dynamo op packet)."""
    t = node.target
    if node.op != "call_function":
        return None
    if isinstance(t, torch._ops.OpOverloadPacket):
        qualified = t._qualified_op_name
    elif isinstance(t, torch._ops.OpOverload):
        qualified = t._schema.name
    else:
        return None
    ns, _, name = qualified.partition("::")
    return name if ns == "slimc" else None


def has_slimc_ops(graph: fx.Graph) -> bool:
    return any(slimc_op_name(n) is not None for n in graph.nodes)


def infer_stage(graph: fx.Graph) -> Stage:
    """KERNEL if any slimc op is a kernel op, else FUSED / QDQ by the ops present, else ATEN."""
    names = {name for n in graph.nodes if (name := slimc_op_name(n)) is not None}
    if names - (QDQ_OPS | FUSED_OP_NAMES | FLOAT_OPS):
        return Stage.KERNEL
    if names & FUSED_OP_NAMES:
        return Stage.FUSED
    if names & QDQ_OPS:
        return Stage.QDQ
    return Stage.ATEN
