"""Program: the unit passes transform (graph module, stage, weights, calibration data)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from slimc.errors import UserError
from slimc.stage import Stage
from slimc.weight_source import WeightSource
from slimc.work_dir import WorkDir

if TYPE_CHECKING:
    from slimc.weight_spill import SpillArea

LOC_KEY = "slimc_loc"
"""`node.meta` key holding the module path a node came from (set by capture/canonicalize)."""


SCHEME_KEY = "slimc_scheme"
"""`node.meta` key on a quantized linear (QDQ `aten.linear` or fused op): its LinearQuantScheme."""


def node_loc(node: fx.Node) -> str | None:
    """The module path (`model.layers.0.self_attn.q_proj`) a node was traced from, if any."""
    return node.meta.get(LOC_KEY)


_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(loc: str | None) -> str | None:
    """The repeated block (`model.layers.3`) a module path lies in: its first `.N` component."""
    if not loc:
        return None
    m = _LAYER.match(loc)
    return m.group(1) if m else None


class WeightStore:
    """Named constant tensors of a program (weights, scales, packed data), one at a time.

    Backed by the graph module's attributes. A program captured with a `WeightSource` (a bf16
    checkpoint computed in float32) holds its unwritten weights as meta tensors: `get` then
    returns a fresh copy of the source tensor in the graph's dtype, and `set` stores a tensor of
    the program's own, so the source (the user's model, a memory-mapped checkpoint) is never
    modified and no full float32 copy of the model exists at any time.
    """

    def __init__(self, gm: fx.GraphModule, source: WeightSource | None = None) -> None:
        self._gm = gm
        self._source = source

    def _attr(self, target: str) -> Any:
        obj: Any = self._gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def __contains__(self, target: str) -> bool:
        try:
            return isinstance(self._attr(target), torch.Tensor)
        except AttributeError:
            return False

    def get(self, target: str) -> torch.Tensor:
        obj = self._attr(target)
        if not isinstance(obj, torch.Tensor):
            raise AttributeError(f"{target!r} is not a tensor")
        if self._in_source(obj, target):
            assert self._source is not None
            return self._source.read(target, obj.dtype)
        return obj

    def _in_source(self, obj: torch.Tensor, target: str) -> bool:
        """Whether `target` (whose attribute is `obj`) is an unwritten weight of the source."""
        return obj.is_meta and self._source is not None and target in self._source

    def get_stored(self, target: str) -> torch.Tensor | None:
        """The source tensor of an unwritten weight in its stored dtype (no copy: do not write
        it), or None when the program holds `target` itself."""
        obj = self._attr(target)
        if self._in_source(obj, target):
            assert self._source is not None
            return self._source.stored(target)
        return None

    def is_written(self, target: str) -> bool:
        """Whether `target` holds a tensor of the program's own (not an unread source weight)."""
        return not self._attr(target).is_meta

    def set(self, target: str, value: torch.Tensor) -> None:
        """Create or replace the constant `target` (a dotted path) with a plain tensor."""
        *parents, leaf = target.split(".")
        mod: torch.nn.Module = self._gm
        for part in parents:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        if hasattr(mod, leaf) and leaf not in mod._buffers:
            delattr(mod, leaf)
        mod.register_buffer(leaf, value.detach())

    def delete(self, target: str) -> None:
        """Remove constant `target` from the program, and the source's reference to it."""
        *parents, leaf = target.split(".")
        mod: Any = self._gm
        for part in parents:
            mod = getattr(mod, part)
        delattr(mod, leaf)
        if self._source is not None:
            self._source.forget(target)

    def names(self) -> list[str]:
        """The constants the graph reads, in graph order."""
        return [str(node.target) for node in self._gm.graph.find_nodes(op="get_attr")]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for target in self.names():
            yield target, self.get(target)

    def written_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the constants the program holds itself: what a pass wrote, and
        every constant of a program without a source."""
        for target in self.names():
            if self.is_written(target):
                yield target, self.get(target)


@dataclass(frozen=True)
class RunContext:
    """How the caller runs the pipeline, for every pass to follow (not a pass option).

    Attributes:
        progress: show progress bars for layer-by-layer calibration.
        work_dir: where layer-wise passes record finished layers, and find those a stopped
            run finished (`slimc quant --resume`); None records nothing.
        spill: where the tensors passes write move as layers finish (memory-mapped files);
            None keeps them in memory.
    """

    progress: bool = True
    work_dir: WorkDir | None = None
    spill: SpillArea | None = None


@dataclass
class Program:
    """A captured model: graph module, current stage, weights and calibration samples.

    Attributes:
        graph_module: one GraphModule, weights as `get_attr` constants.
        stage: where the program is in ATEN -> QDQ -> FUSED -> KERNEL.
        example_inputs: positional inputs the graph was captured with.
        calibration: positional input tuples for calibration, or None when not given.
        statistics: per-pass counters (`--pass-statistics`).
        metadata: free-form facts (source model, capture options).
        context: how the caller runs the pipeline (progress bars).
        weight_source: where the unwritten weights live when the program computes in a wider
            dtype than its checkpoint (see `WeightStore`); None when the graph holds them all.
    """

    graph_module: fx.GraphModule
    stage: Stage = Stage.ATEN
    example_inputs: tuple[Any, ...] = ()
    calibration: Sequence[tuple[Any, ...]] | None = None
    statistics: dict[str, dict[str, float]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    context: RunContext = field(default_factory=RunContext)
    weight_source: WeightSource | None = None

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def weights(self) -> WeightStore:
        return WeightStore(self.graph_module, self.weight_source)

    def constant_node(self, target: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        """Store `value` as constant `target` and return a `get_attr` node placed before `before`."""
        self.weights.set(target, value)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(target)
        node.meta["val"] = self.fake(value)
        loc = node_loc(before)
        if loc is not None:
            node.meta[LOC_KEY] = loc
        return node

    @property
    def fake_mode(self) -> FakeTensorMode:
        """The fake-tensor mode of the graph's `meta["val"]`s (shared, so symbolic dims agree)."""
        vals = [n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"]
        mode = detect_fake_mode(vals)
        if mode is None:
            mode = self.metadata.setdefault(
                "_fake_mode", FakeTensorMode(allow_non_fake_inputs=True)
            )
        return mode

    def fake(self, value: torch.Tensor) -> torch.Tensor:
        """A fake tensor standing for the constant `value` in this graph's fake mode."""
        return self.fake_mode.from_tensor(value, static_shapes=True)

    def unique_target(self, base: str) -> str:
        """A constant name not used yet, derived from `base`."""
        target, i = base, 1
        while target in self.weights:
            target = f"{base}_{i}"
            i += 1
        return target

    def require_calibration(self, pass_name: str) -> Sequence[tuple[Any, ...]]:

        if not self.calibration:
            raise UserError(
                f"pass {pass_name!r} needs calibration data: pass calib=... to slimc.compile "
                "(or use a model with a default calibration set)"
            )
        return self.calibration

    def recompile(self) -> None:
        self.graph.eliminate_dead_code()
        self.graph.lint()
        self.graph_module.recompile()
        self.drop_unused_constants()

    def drop_unused_constants(self) -> None:
        used = {str(n.target) for n in self.graph.find_nodes(op="get_attr")}
        for name, _ in list(self.graph_module.named_buffers()) + list(
            self.graph_module.named_parameters()
        ):
            if name not in used:
                self.weights.delete(name)

    def __call__(self, *args: Any) -> Any:
        if self.weight_source is None:
            return self.graph_module(*args)
        with self.materialized():
            return self.graph_module(*args)

    @contextlib.contextmanager
    def materialized(self) -> Iterator[None]:
        """Hold every source weight in the graph module while inside (a full copy in the
        graph's dtype: for running the graph module directly, or serializing it)."""
        store = self.weights
        unread = [t for t in dict.fromkeys(store.names()) if not store.is_written(t)]
        placeholders = {t: store._attr(t) for t in unread}
        for target in unread:
            replace_attr(self.graph_module, target, store.get(target))
        try:
            yield
        finally:
            for target, meta in placeholders.items():
                replace_attr(self.graph_module, target, meta)


def replace_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Swap the tensor at `target` keeping its kind (parameter or buffer)."""
    *parents, leaf = target.split(".")
    mod: Any = gm
    for part in parents:
        mod = getattr(mod, part)
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value
