"""Layer-wise calibration runner: samples flow through the graph one decoder layer at a time."""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from slimc.heap import resident_mb
from slimc.program import Program, layer_of, node_loc
from slimc.weight_spill import spill_constants_of

log = logging.getLogger(__name__)

Hook = Callable[[fx.Node, tuple[Any, ...]], None]
"""Called with a node and its materialized positional arguments, before the node runs."""


@dataclass
class Segment:
    """A contiguous run of graph nodes that belong to one repeated block (or to none)."""

    key: str | None
    index: int
    nodes: list[fx.Node]

    @property
    def label(self) -> str:
        return self.key or ("prologue" if self.index == 0 else "epilogue")


def split_segments(graph: fx.Graph) -> list[Segment]:
    """Cut the graph into maximal runs of nodes with the same decoder-layer key.

    A node without a location inherits the key of the node before it, so helper nodes (shape
    arithmetic, getitems) stay with their block. Placeholders, constants and the output are not
    part of any segment.
    """
    segments: list[Segment] = []
    key: str | None = None
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        loc = node_loc(node)
        if loc is not None:
            key = layer_of(loc)
        if not segments or segments[-1].key != key:
            segments.append(Segment(key, len(segments), []))
        segments[-1].nodes.append(node)
    return segments


class LayerwiseRunner:
    """Runs calibration samples segment by segment, keeping only values still needed later.

    A pass visits each segment in order: it may run the segment with hooks (to observe
    activations), rewrite its nodes (to quantize them), and the runner then runs the rewritten
    segment so the next layer sees the already-quantized outputs. Peak memory is the model plus
    the values live across one segment boundary for every sample.
    """

    def __init__(
        self,
        program: Program,
        samples: Sequence[tuple[Any, ...]],
        progress: bool | None = None,
        keep_outputs: bool = False,
    ) -> None:
        self.program = program
        self.samples = list(samples)
        self.progress = program.context.progress if progress is None else progress
        self.keep_outputs = keep_outputs
        self.layer_seconds: dict[str, float] = {}
        """Wall seconds of each segment in the last `run` (visit and advance), by label."""
        self.reused_segments = 0
        """Segments whose outputs a visit's `forward(advance=True)` stored (not run twice)."""
        self._advanced: set[fx.Node] = set()
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
        self._envs: list[dict[fx.Node, Any]] = []
        for sample in self.samples:
            if len(sample) != len(placeholders):
                raise ValueError(
                    f"calibration sample has {len(sample)} inputs, graph takes {len(placeholders)}"
                )
            self._envs.append(dict(zip(placeholders, sample, strict=True)))

    def _lookup(self, env: dict[fx.Node, Any]) -> Callable[[fx.Node], Any]:
        weights = self.program.weights

        def get(n: fx.Node) -> Any:
            if n.op == "get_attr":
                return weights.get(str(n.target))
            return env[n]

        return get

    def forward(
        self,
        nodes: Sequence[fx.Node],
        hooks: dict[fx.Node, Hook] | None = None,
        keep: bool = False,
        *,
        advance: bool = False,
    ) -> None:
        """Run `nodes` for every sample and call hooks.

        With `keep`, the values used after these nodes are stored for the next segment; values
        used only inside are dropped as soon as the sample is done. `advance` (implies `keep`)
        is for a visit whose rewrite of the segment is exact (a smoothing fold): the outputs
        stored now stand for the rewritten segment's, and `run` does not run it a second time
        when they cover every value later segments read.
        """
        hooks = hooks or {}
        keep = keep or advance
        escaping = self._escaping(nodes)
        if advance:
            self._advanced = set(escaping)
        constant = sample_independent(nodes, hooks)
        with torch.inference_mode():
            shared: dict[fx.Node, Any] = {}
            get_weight = self._lookup({})

            def constant_value(n: fx.Node) -> Any:
                return shared[n] if n in shared else get_weight(n)

            gathers = self._narrow_gathers(nodes)
            for weight, stored in gathers.values():
                shared[weight] = stored  # rows are gathered narrow, then widened
            for node in nodes:  # each weight read once per call (a widened copy, for a source)
                for weight in node.all_input_nodes:
                    if weight.op == "get_attr" and weight not in shared:
                        shared[weight] = get_weight(weight)
            for node in constant:  # e.g. a dequantized weight: computed once, not per sample
                args = fx.node.map_arg(node.args, constant_value)
                kwargs = fx.node.map_arg(node.kwargs, constant_value)
                shared[node] = node.target(*args, **kwargs)
            per_sample = [n for n in nodes if n not in shared]
            for env in self._envs:
                get = self._lookup(env)
                local: dict[fx.Node, Any] = dict(shared)

                def lookup(n: fx.Node, local: dict[fx.Node, Any] = local, get: Any = get) -> Any:
                    return local[n] if n in local else get(n)

                for node in per_sample:
                    args = fx.node.map_arg(node.args, lookup)
                    kwargs = fx.node.map_arg(node.kwargs, lookup)
                    if node in hooks:
                        hooks[node](node, args)
                    local[node] = node.target(*args, **kwargs)
                    if node in gathers:
                        local[node] = local[node].to(gathers[node][0].meta["val"].dtype)
                if keep:
                    env.update((n, local[n]) for n in escaping)

    def _narrow_gathers(self, nodes: Sequence[fx.Node]) -> dict[fx.Node, tuple[fx.Node, Any]]:
        """Embedding lookups in `nodes` of a weight the program reads from a narrower source
        (a bf16 embedding computed in float32), each with its weight node and stored tensor:
        gathering the stored rows and widening them is exact and widens only those rows, not
        the whole table."""
        out: dict[fx.Node, tuple[fx.Node, Any]] = {}
        inside = set(nodes)
        store = self.program.weights
        for node in nodes:
            weight = node.args[0] if node.target is torch.ops.aten.embedding.default else None
            if not isinstance(weight, fx.Node) or weight.op != "get_attr":
                continue
            here = [u for u in weight.users if u in inside]
            if any(u.target is not node.target or u.args[0] is not weight for u in here):
                continue  # read otherwise here too (a tied lm_head): widened whole
            stored = store.get_stored(str(weight.target))
            if stored is not None and "val" in weight.meta:
                out[node] = (weight, stored)
        return out

    def outputs(self) -> list[Any]:
        """The graph outputs per sample after `run` (needs `keep_outputs=True`)."""
        out_node = next(n for n in self.program.graph.nodes if n.op == "output")
        results = []
        for env in self._envs:
            results.append(fx.node.map_arg(out_node.args[0], self._lookup(env)))
        return results

    def _release(self, done: set[fx.Node]) -> None:
        """Drop values whose every user has run."""
        for env in self._envs:
            for n in [n for n in env if n.users and all(u in done for u in n.users)]:
                del env[n]

    def _escaping(self, nodes: Sequence[fx.Node]) -> list[fx.Node]:
        """Nodes whose values later segments read (and the graph outputs, if kept)."""
        inside = set(nodes)

        def later(user: fx.Node) -> bool:
            return user not in inside and (user.op != "output" or self.keep_outputs)

        return [n for n in nodes if any(later(u) for u in n.users)]

    def run(self, visit: Callable[[Segment, LayerwiseRunner], None]) -> None:
        """Visit every segment in order, then advance the samples through it.

        `visit` may call `forward(segment.nodes, hooks)` and rewrite the segment's nodes (without
        erasing the segment's last node). The segment is re-collected before advancing.
        """
        segments = split_segments(self.program.graph)
        bar = _progress(len(segments), "calibrating", self.progress)
        done: set[fx.Node] = set()
        prev_last: fx.Node | None = None
        self.layer_seconds = {}
        try:
            for seg in segments:
                start = time.perf_counter()
                last = seg.nodes[-1]
                self._advanced = set()
                visit(seg, self)
                advanced_by_visit, self._advanced = self._advanced, set()
                if last.graph is not self.program.graph or last._erased:
                    raise RuntimeError(f"pass erased the last node of segment {seg.label}")
                seg.nodes = _nodes_between(self.program.graph, prev_last, last)
                escaping = self._escaping(seg.nodes)  # none: the last block feeds only the output
                if escaping and not set(escaping) <= advanced_by_visit:
                    self.forward(seg.nodes, keep=True)
                else:
                    self.reused_segments += bool(escaping)
                done.update(seg.nodes)
                self._release(done)
                spill_constants_of(self.program, seg.nodes)
                prev_last = last
                seconds = time.perf_counter() - start
                self.layer_seconds[seg.label] = seconds
                rate = len(self._envs) / seconds if seconds > 0 else 0.0
                bar.set_postfix_str(
                    f"{seg.label} {seconds:.1f} s, {rate:.0f} samples/s, RSS {resident_mb()} MB",
                    refresh=False,
                )
                bar.update(1)
        finally:
            bar.close()
        self._log_layer_times()

    def _log_layer_times(self) -> None:
        """Log the fastest and slowest decoder layer (a time growing with depth is a bug)."""
        layers = {k: v for k, v in self.layer_seconds.items() if k not in ("prologue", "epilogue")}
        if not layers:
            return
        slowest = max(layers, key=layers.__getitem__)
        fastest = min(layers, key=layers.__getitem__)
        log.info(
            "calibration: %d layers on %d samples, %.2f s per layer (fastest %s %.2f s, "
            "slowest %s %.2f s)",
            len(layers),
            len(self._envs),
            sum(layers.values()) / len(layers),
            fastest,
            layers[fastest],
            slowest,
            layers[slowest],
        )


def sample_independent(nodes: Sequence[fx.Node], hooks: dict[fx.Node, Hook]) -> list[fx.Node]:
    """The nodes of `nodes` computed from constants only (a weight's dequantization, a reshaped
    scale): functional, deterministic ops whose inputs are all constants or such nodes. They
    give every sample the same value, so the runner computes them once. Hooked nodes are not
    among them (their hooks run per sample)."""
    found: set[fx.Node] = set()
    for node in nodes:
        if node in hooks or node.op != "call_function" or not _pure(node.target):
            continue
        inputs = node.all_input_nodes
        if inputs and all(i.op == "get_attr" or i in found for i in inputs):
            found.add(node)
    return [n for n in nodes if n in found]


def _pure(target: Any) -> bool:
    """A functional op that gives the same result for the same inputs."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    return not schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def _nodes_between(graph: fx.Graph, after: fx.Node | None, last: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    node = after.next if after is not None else next(iter(graph.nodes))
    while True:
        if node.op not in ("placeholder", "get_attr", "output"):
            out.append(node)
        if node is last:
            return out
        node = node.next


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled, leave=False)
