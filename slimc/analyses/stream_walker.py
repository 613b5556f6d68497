"""The walk behind the ResidualStream analysis: which nodes after the embedding carry the stream."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from slimc.analyses.group_discovery import keeps_channels, scale_carrier
from slimc.analyses.group_types import CASTS, MOVES, module_of, op_name
from slimc.analyses.stream_types import (
    CHANNEL_SUMS,
    SHAPE_ONLY,
    NormScale,
    OnlinePoint,
    StreamRefusal,
    copies_rows,
    is_l2_over_channels,
    is_last_dim,
    per_token,
    per_token_factor,
    reads_value,
    sums_rows,
    tensor_of,
)
from slimc.ir.builder import is_constant
from slimc.linear_select import EXPERT_LINEAR

if TYPE_CHECKING:
    from slimc.analyses.residual_stream import ResidualStream

aten = torch.ops.aten


class StreamWalker:
    """Classifies every node after the embedding, in graph order, as rotated or not.

    `rot` holds the stream tensors (their channels are rotated); `norm_of` tags those that still
    carry a norm's scale (only linears may read them); `squares` holds `x * x` of stream tensors
    (only channel sums may read them); `centered` holds the stream tensors whose channel mean was
    removed (a LayerNorm's output, `x - mean(x)`); `means` maps a channel mean to its input.
    Every other node keeps its value.
    """

    def __init__(self, result: ResidualStream) -> None:
        self.result = result
        self.rot: set[fx.Node] = result.nodes
        self.norm_of: dict[fx.Node, NormScale] = {}
        self.squares: set[fx.Node] = set()
        self.centered: set[fx.Node] = set()
        self.means: dict[fx.Node, fx.Node] = {}

    def refuse(self, node: fx.Node, reason: str) -> None:
        self.result.refused.append(StreamRefusal(node, reason))

    def run(self, graph: fx.Graph, start: fx.Node) -> None:
        self.result.embeddings.append(start)
        self.rot.add(start)
        seen = False
        for node in graph.nodes:
            if node is start:
                seen = True
                continue
            if not seen:
                continue
            if node.op == "output":
                leaked = [a.name for a in node.all_input_nodes if a in self.rot | self.squares]
                if leaked:
                    self.refuse(node, f"the stream is a graph output ({', '.join(leaked)})")
                continue
            if node.op == "call_function":
                self.visit(node)

    # -- one node ----------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        t = node.target
        inputs = node.all_input_nodes
        if any(a in self.squares for a in inputs):
            self.visit_square_user(node)
            return
        if t is aten.type_as.default:
            inputs = inputs[:1]  # the second operand gives only the dtype
        if not any(a in self.rot for a in inputs) or t in SHAPE_ONLY:
            return
        x = node.args[0]
        others = [a for a in inputs if a is not x]
        tags = {id(self.norm_of[a]): self.norm_of[a] for a in inputs if a in self.norm_of}
        tag = next(iter(tags.values()), None)
        channel_op = x in self.rot and not any(a in self.rot for a in others)
        if t in MOVES and channel_op:
            if t is not aten.type_as.default and not keeps_channels(node):
                self.refuse(node, f"{op_name(node)} moves channels of the stream")
                return
            self.mark(node, tag)
        elif t in (aten.linear.default, EXPERT_LINEAR) and channel_op:
            if not is_constant(node.args[1]):
                self.refuse(node, "a linear reading the stream has no constant weight")
                return
            self.result.readers.append(node)  # an expert stack: every expert reads it
            self.reads_mean(node, x)
            if tag is not None:
                tag.readers.append(node)
        elif t is aten.repeat_interleave.self_int and channel_op and copies_rows(node):
            self.mark(node, tag)  # each token's copies for its chosen experts (MoE)
        elif tag is not None and self.per_token_scaling(node):
            self.mark(node, tag)  # commutes with the norm scale and with the rotation
        elif tag is not None:
            norm = tag.carrier.node.name
            self.refuse(node, f"reads the output of norm {norm}, whose scale only linears absorb")
        elif t is aten.pow.Tensor_Scalar and node.args[1] == 2:
            self.squares.add(node)
            self.reads_mean(node, x)
        elif t is aten.linalg_vector_norm.default and is_l2_over_channels(node):
            self.reads_mean(node, x)  # |x| per token: unchanged by the rotation
        elif t in (aten.mul.Tensor, aten.div.Tensor):
            self.visit_product(node)
        elif t in (aten.add.Tensor, aten.sub.Tensor):
            self.visit_sum(node)
        elif t is aten.rms_norm.default:
            self.reads_mean(node, x)
            self.visit_rms_norm(node)
        elif t is aten.layer_norm.default and channel_op:
            self.visit_layer_norm(node)
        elif t in CHANNEL_SUMS and channel_op and self.channel_mean(node):
            return
        elif t in CHANNEL_SUMS:
            self.refuse(node, f"{op_name(node)} of the stream's channels is not rotation-invariant")
        else:
            self.refuse(
                node, f"{op_name(node)} reads the stream; a rotation through it is not exact"
            )

    def mark(self, node: fx.Node, tag: NormScale | None, centered: bool | None = None) -> None:
        """Add `node` to the stream (with the norm scale it carries); it is centered when told,
        or when every stream tensor it reads is."""
        self.rot.add(node)
        if tag is not None:
            self.norm_of[node] = tag
        if centered is None:
            centered = all(a in self.centered for a in node.all_input_nodes if a in self.rot)
        if centered:
            self.centered.add(node)

    def mark_norm(self, node: fx.Node, refusal: str, centered: bool | None = None) -> None:
        """Add a norm with a weight to the stream, its weight (and bias) the norm scale of the
        linears reading it; refused with `refusal` when they are not constants."""
        carrier = scale_carrier(node, self.result.hidden)
        if carrier is None:
            self.refuse(node, refusal)
            return
        norm = NormScale(carrier)
        self.result.norms.append(norm)
        self.mark(node, norm, centered=centered)

    def reads_mean(self, node: fx.Node, x: object) -> None:
        """`node` reads stream tensor `x` in a way that depends on its channel mean (unless `x`
        is centered): mean-baking the writers would change its value."""
        if x not in self.centered:
            self.result.mean_dependent.append(node)

    def channel_mean(self, node: fx.Node) -> bool:
        """`mean(x, -1)` / `sum(x, -1)` of a stream tensor: a per-token value that a rotation
        fixing the all-ones direction keeps. Whether its users only center `x` decides whether
        mean-baking (which makes it zero) is exact."""
        x = node.args[0]
        val = tensor_of(x)
        if val is None or not is_last_dim(node.args[1], val.dim()):
            return False
        assert isinstance(x, fx.Node)
        self.result.mean_readers.append(node)
        self.means[node] = x
        centering = all(
            u.target in SHAPE_ONLY or (u.target is aten.sub.Tensor and u.args == (x, node))
            for u in node.users
        )
        if not centering or node.target is not aten.mean.dim:
            self.reads_mean(node, x)
        return True

    def visit_layer_norm(self, node: fx.Node) -> None:
        """A LayerNorm over the channels: its output is centered, and its weight and bias are a
        norm scale for the linears reading it."""
        shape = node.args[1]
        if not isinstance(shape, (list, tuple)) or list(shape) != [self.result.hidden]:
            hidden = self.result.hidden
            self.refuse(node, f"layer_norm over {shape}, not over the {hidden} channels")
            return
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        self.result.mean_readers.append(node)
        if weight is None and bias is None:
            self.mark(node, None, centered=True)
            return
        self.mark_norm(
            node, "layer_norm whose weight is not a constant (or a bias without one)", centered=True
        )

    def visit_square_user(self, node: fx.Node) -> None:
        square = node.args[0]
        if node.target in CASTS and square in self.squares:
            self.squares.add(node)
            return
        val = tensor_of(square)
        if node.target in CHANNEL_SUMS and val is not None and is_last_dim(node.args[1], val.dim()):
            return  # |x|^2 per token: unchanged by the rotation
        self.refuse(node, f"{op_name(node)} reads the square of the stream, not only a channel sum")

    def per_token_scaling(self, node: fx.Node) -> bool:
        """`x * s` or `x / s` of a stream tensor x by a per-token (or scalar) s."""
        if node.target not in (aten.mul.Tensor, aten.div.Tensor):
            return False
        a, b = node.args[0], node.args[1]
        if a in self.rot and b not in self.rot:
            return per_token(b)
        return (
            node.target is aten.mul.Tensor and b in self.rot and a not in self.rot and per_token(a)
        )

    def visit_product(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        if node.target is aten.mul.Tensor and a is b:
            self.squares.add(node)
            self.reads_mean(node, a)
            return
        if a in self.rot and b in self.rot:
            self.refuse(node, "multiplies two stream tensors")
            return
        if node.target is aten.div.Tensor and a not in self.rot:
            self.refuse(node, "divides by the stream")
            return
        if self.per_token_scaling(node):
            self.mark(node, None)
            return
        carrier = (
            scale_carrier(node, self.result.hidden) if node.target is aten.mul.Tensor else None
        )
        if carrier is not None and carrier.node is node:
            norm = NormScale(carrier)
            self.result.norms.append(norm)
            self.mark(node, norm)
            return
        self.refuse(node, "multiplies the stream by per-channel values that are not a norm scale")

    def visit_sum(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        if "alpha" in node.kwargs or len(node.args) > 2:
            self.refuse(node, f"{op_name(node)} with alpha is not supported")
            return
        if a in self.rot and b in self.rot:
            self.mark(node, None)
            return
        other = b if a in self.rot else a
        val = tensor_of(other)
        if a in self.rot and isinstance(other, fx.Node) and per_token(other):
            # x - s: a per-token shift along the all-ones direction (x - mean(x) centers x)
            self.result.mean_readers.append(node)
            centers = node.target is aten.sub.Tensor and self.means.get(other) is a
            self.mark(node, None, centered=centers or a in self.centered)
            return
        if val is None or val.dim() == 0 or val.shape[-1] != self.result.hidden:
            self.refuse(node, "adds a value that is not a hidden-size tensor to the stream")
            return
        assert isinstance(other, fx.Node)
        writers, path, why = self.trace_writers(other, node)
        if not writers:
            self.result.online.append(OnlinePoint(other, node, why))
        for writer in writers:
            bucket = self.result.embeddings if writer.target is aten.embedding.default else None
            (bucket if bucket is not None else self.result.writers).append(writer)
        self.rot.update([*writers, *path])
        self.mark(node, None)

    def visit_rms_norm(self, node: fx.Node) -> None:
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        if weight is None:
            self.mark(node, None)
            return
        self.mark_norm(node, "rms_norm with a weight that is not a constant")

    # -- writers -----------------------------------------------------------------------------
    def trace_writers(
        self, value: fx.Node, add: fx.Node
    ) -> tuple[list[fx.Node], list[fx.Node], str]:
        """The linears (or embeddings) whose outputs reach `add` as `value`, through casts,
        moves, scalar factors and sums of such values (parallel attention + MLP), read by
        nothing else; or no writer and the reason."""
        writers: dict[fx.Node, None] = {}
        path: dict[fx.Node, None] = {}
        stack = [value]
        while stack:
            node = stack.pop()
            if node in writers or node in path:
                continue
            if node.op != "call_function":
                return [], [], f"{node.name} is not computed by a linear"
            t = node.target
            if (t is aten.linear.default and is_constant(node.args[1])) or (
                t is aten.embedding.default and is_constant(node.args[0])
            ):
                writers[node] = None
                continue
            if t is EXPERT_LINEAR and is_constant(node.args[1]):
                writers[node] = None  # an MoE expert stack: every expert's rows rotate
                continue
            factor = per_token_factor(node)  # a scalar, or a router weight per row
            if factor is not None:
                path[node] = None
                stack.append(factor)
            elif t in MOVES and keeps_channels(node):
                path[node] = None
                stack.append(node.args[0])  # type: ignore[arg-type]
            elif t is aten.sum.dim_IntList and sums_rows(node):
                path[node] = None  # an MoE block's sum over each token's chosen experts
                stack.append(node.args[0])  # type: ignore[arg-type]
            elif t in (aten.add.Tensor, aten.add_.Tensor) and self.is_sum_of_values(node):
                # in place (`mlp_out += attn_out`, Falcon): the leak check below makes sure
                # nothing else reads the mutated operand
                path[node] = None
                stack.extend(node.args)  # type: ignore[arg-type]
            else:
                return [], [], f"{op_name(node)} at {module_of(node)} is not a linear, cast or move"
        allowed = {add, *path}
        leaks = sorted(
            u.name
            for n in (*writers, *path)
            for u in n.users
            if u not in allowed and reads_value(u, n)
        )
        if leaks:
            first = next(iter(writers))
            return [], [], f"the output of {first.name} is also read by {', '.join(leaks)}"
        return list(writers), list(path), ""

    def is_sum_of_values(self, node: fx.Node) -> bool:
        """`a + b` of two hidden-size tensors that are not stream tensors."""
        if len(node.args) != 2 or node.kwargs:
            return False
        vals = [tensor_of(a) for a in node.args]
        return all(
            isinstance(a, fx.Node)
            and a not in self.rot
            and v is not None
            and v.dim() > 0
            and v.shape[-1] == self.result.hidden
            for a, v in zip(node.args, vals, strict=True)
        )
