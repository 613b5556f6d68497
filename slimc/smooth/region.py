"""Regions: the nodes of one module subtree, recorded on calibration data and re-run in isolation.

A search-based smoothing pass (AWQ) measures a candidate scale by running the smallest module
that holds all the linears it scales (their lowest common ancestor: the attention block for
q/k/v, the MLP for gate/up, the linear itself for o_proj or down_proj) on recorded inputs, with
candidate weights substituted. The module is found from the graph: the common module path of
the linears, and the nodes of the current segment traced from that path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from slimc.analyses.linear_groups import where_all
from slimc.program import Program, node_loc
from slimc.runner import Hook

Path = tuple[int | str, ...]


class RegionError(ValueError):
    """The region of some linears cannot be formed (no module path, not in this segment...)."""


def common_prefix(locs: Sequence[str]) -> str:
    """The longest dotted module path every `loc` equals or lies under ('' if none)."""
    parts = [loc.split(".") for loc in locs]
    out: list[str] = []
    for comps in zip(*parts, strict=False):
        if any(c != comps[0] for c in comps):
            break
        out.append(comps[0])
    return ".".join(out)


@dataclass
class Region:
    """A set of graph nodes in execution order, with what it reads and what escapes it.

    Attributes:
        nodes: the region's `call_function` nodes, in graph order.
        inputs: values produced outside the region that its nodes read (constants excluded).
        constants: the `get_attr` nodes its nodes read (weights, norm scales...).
        outputs: region nodes read outside the region.
        prefix: the module path the region was cut from (None for an ad-hoc region).
    """

    nodes: list[fx.Node]
    inputs: list[fx.Node]
    constants: list[fx.Node]
    outputs: list[fx.Node]
    prefix: str | None = None

    @classmethod
    def of(cls, nodes: Sequence[fx.Node], prefix: str | None = None) -> Region:
        """The region made of exactly `nodes` (given in graph order)."""
        inside = set(nodes)
        inputs: list[fx.Node] = []
        constants: list[fx.Node] = []
        seen: set[fx.Node] = set()
        for n in nodes:
            for a in n.all_input_nodes:
                if a in inside or a in seen:
                    continue
                seen.add(a)
                (constants if a.op == "get_attr" else inputs).append(a)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        return cls(list(nodes), inputs, constants, outputs, prefix)

    def __str__(self) -> str:
        at = self.prefix or ",".join(node_loc(n) or n.name for n in self.outputs)
        return (
            f"{at} ({len(self.nodes)} nodes, inputs {where_all(self.inputs)}"
            f"; outputs {where_all(self.outputs)})"
        )

    def run(
        self,
        program: Program,
        inputs: Mapping[fx.Node, Any],
        overrides: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Any]:
        """Run the region on recorded `inputs`; return the values of `outputs`, in order.

        `overrides` maps a constant's target (`get_attr` name) to the tensor used in its place;
        other constants are read from the program's current weights.
        """
        weights = program.weights
        env: dict[fx.Node, Any] = dict(inputs)
        for c in self.constants:
            target = str(c.target)
            env[c] = overrides[target] if overrides and target in overrides else weights.get(target)

        def lookup(n: fx.Node) -> Any:
            return env[n]

        for node in self.nodes:
            args = fx.node.map_arg(node.args, lookup)
            kwargs = fx.node.map_arg(node.kwargs, lookup)
            env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
        return [env[n] for n in self.outputs]


def lca_region(targets: Sequence[fx.Node], nodes: Sequence[fx.Node]) -> Region:
    """The region of the targets' lowest common ancestor module, within the segment `nodes`.

    The module is the common prefix of the targets' module paths; the region is every node of
    `nodes` traced from that module or one inside it, plus location-less helper nodes that
    only connect region nodes.

    Raises:
        RegionError: a target has no module path, the targets share no module, or not all of
            them are among `nodes`.
    """
    locs = [node_loc(t) for t in targets]
    if any(loc is None for loc in locs):
        raise RegionError("a target linear has no module path")
    prefix = common_prefix([loc for loc in locs if loc is not None])
    if not prefix:
        raise RegionError(f"the targets {', '.join(map(str, locs))} share no module")
    within = prefix + "."
    members: set[fx.Node] = set()
    for n in nodes:
        loc = node_loc(n)
        if loc is not None and (loc == prefix or loc.startswith(within)):
            members.add(n)
    missing = [t for t in targets if t not in members]
    if missing:
        raise RegionError(
            f"targets {where_all(missing)} are not in the segment of module {prefix}"
        )
    # helper nodes without a location that only connect region nodes (e.g. getitems)
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if n in members or node_loc(n) is not None or not n.users:
                continue
            if all(u in members for u in n.users) and any(a in members for a in n.all_input_nodes):
                members.add(n)
                changed = True
    return Region.of([n for n in nodes if n in members], prefix)


def _leaves(args: Any, path: Path = ()) -> Iterator[tuple[Path, fx.Node]]:
    if isinstance(args, fx.Node):
        yield path, args
    elif isinstance(args, (tuple, list)):
        for i, a in enumerate(args):
            yield from _leaves(a, (*path, i))
    elif isinstance(args, dict):
        for k, a in args.items():
            yield from _leaves(a, (*path, k))


def _at(values: Any, path: Path) -> Any:
    for p in path:
        values = values[p]
    return values


class Recorder:
    """Records, for every calibration sample, the values a region reads from outside it.

    Install `hooks()` in `LayerwiseRunner.forward`; afterwards `samples[i]` maps each of the
    region's `inputs` to its value in sample `i`. Each input is taken from the positional
    arguments of the first region node that reads it (hooks do not see keyword arguments).

    Raises:
        RegionError: (at construction) an input is only read through keyword arguments.
    """

    def __init__(self, region: Region) -> None:
        self.region = region
        wanted = set(region.inputs)
        self._readers: dict[fx.Node, list[tuple[Path, fx.Node]]] = {}
        for n in region.nodes:
            for path, a in _leaves(n.args):
                if a in wanted:
                    self._readers.setdefault(n, []).append((path, a))
                    wanted.discard(a)
        if wanted:
            raise RegionError(
                f"inputs {where_all(sorted(wanted))} are only read as keyword arguments"
            )
        if not self._readers:
            raise RegionError("the region reads nothing from outside")
        self._first = next(iter(self._readers))
        self.samples: list[dict[fx.Node, Any]] = []

    def hooks(self) -> dict[fx.Node, Hook]:
        return {n: self._hook for n in self._readers}

    def _hook(self, node: fx.Node, args: tuple[Any, ...]) -> None:
        if node is self._first:
            self.samples.append({})
        current = self.samples[-1]
        for path, a in self._readers[node]:
            current[a] = _at(args, path)


def merge_hooks(*hook_maps: Mapping[fx.Node, Hook]) -> dict[fx.Node, Hook]:
    """One hook map calling, for each node, every given hook in the order given."""
    lists: dict[fx.Node, list[Hook]] = {}
    for hooks in hook_maps:
        for node, fn in hooks.items():
            lists.setdefault(node, []).append(fn)
    merged: dict[fx.Node, Hook] = {}
    for node, fns in lists.items():
        if len(fns) == 1:
            merged[node] = fns[0]
        else:
            merged[node] = _chain(fns)
    return merged


def _chain(fns: list[Hook]) -> Callable[[fx.Node, tuple[Any, ...]], None]:
    def hook(node: fx.Node, args: tuple[Any, ...]) -> None:
        for fn in fns:
            fn(node, args)

    return hook
