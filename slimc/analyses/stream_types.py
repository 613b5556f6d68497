"""The vocabulary of the residual stream: norm scales on it, points no weight can rotate,
refusals, the ops a rotation passes or reads, and the node predicates the walk uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from slimc.analyses.group_types import ScaleCarrier
from slimc.program import node_loc

aten = torch.ops.aten

SHAPE_ONLY = frozenset({aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int})
"""Ops that read only a tensor's shape, never its values."""

CHANNEL_SUMS = frozenset({aten.mean.dim, aten.sum.dim_IntList})
"""Reductions that, over the channel dim of `x * x`, give a rotation-invariant `|x|^2` (RMS)."""


@dataclass
class NormScale:
    """A norm's per-channel scale applied to the stream; fused into the linears reading it."""

    carrier: ScaleCarrier
    readers: list[fx.Node] = field(default_factory=list)


@dataclass(frozen=True)
class OnlinePoint:
    """A value added into the stream that no weight can rotate (e.g. a sandwich norm's output)."""

    value: fx.Node
    add: fx.Node
    reason: str


@dataclass(frozen=True)
class StreamRefusal:
    """A node reading the stream where a rotation would not be exact, and why."""

    node: fx.Node | None
    reason: str

    def __str__(self) -> str:
        if self.node is None:
            return self.reason
        loc = node_loc(self.node)
        return f"{self.node.name}{f' ({loc})' if loc else ''}: {self.reason}"


# -- node predicates ------------------------------------------------------------------


def tensor_of(value: object) -> torch.Tensor | None:
    """The example tensor of a node (`meta["val"]`), None for a non-tensor or non-node."""
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def per_token(value: object) -> bool:
    """A Python number, or a tensor that is one value across the channel dim (0-d or `[..., 1]`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    val = tensor_of(value)
    return val is not None and (val.dim() == 0 or val.shape[-1] == 1)


def is_last_dim(dims: object, rank: int) -> bool:
    """Whether `dims` is exactly the channel (last) dim of a rank-`rank` tensor."""
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % rank == rank - 1


def per_token_factor(node: fx.Node) -> fx.Node | None:
    """The operand that `node` scales, when it is `v * s`, `s * v` or `v / s` with `s` a number
    or one value per row (an MoE router's weight for each chosen expert); else None."""
    if node.target not in (aten.mul.Tensor, aten.div.Tensor) or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and per_token(b) and not per_token(a):
        return a
    if node.target is aten.mul.Tensor and isinstance(b, fx.Node) and per_token(a):
        return None if per_token(b) else b
    return None


def copies_rows(node: fx.Node) -> bool:
    """`repeat_interleave(x, n, dim)` along a dim that is not the channels."""
    val = tensor_of(node.args[0])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    return val is not None and isinstance(dim, int) and dim % val.dim() != val.dim() - 1


def sums_rows(node: fx.Node) -> bool:
    """`sum(v, dims)` over dims that are not the channels (each channel summed alone)."""
    val = tensor_of(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else None
    if val is None or not isinstance(dims, (list, tuple)) or not dims:
        return False
    return all(isinstance(d, int) and d % val.dim() != val.dim() - 1 for d in dims)


def reads_value(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` depends on `node`'s values (not only on its shape or dtype)."""
    if user.target in SHAPE_ONLY:
        return False
    return not (user.target is aten.type_as.default and user.args[0] is not node)


def is_l2_over_channels(node: fx.Node) -> bool:
    """`linalg_vector_norm(x, 2, [-1])`: an L2 norm over the channels (rotation-invariant)."""
    val = tensor_of(node.args[0])
    ord_ = node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", 2)
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    return val is not None and ord_ == 2 and is_last_dim(dims, val.dim())
