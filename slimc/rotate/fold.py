"""Folding orthogonal rotations and norm scales into a program's constants (exact in float)."""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable

import torch
from torch import fx

from slimc.analyses.linear_groups import MOVES, SPLITS, LinearGroup
from slimc.analyses.residual_stream import NormScale
from slimc.ir.builder import constant_arg
from slimc.linear_select import bias_index
from slimc.program import Program, node_loc

log = logging.getLogger(__name__)
aten = torch.ops.aten

WEIGHT, BIAS = 1, 2
"""Argument positions of `aten.linear`'s weight and bias."""


# -- constants -------------------------------------------------------------------------------------
def _preferred_target(user: fx.Node, const: fx.Node) -> str:
    """`<module path>.<weight|bias>` of the user, the name the user's model gives the tensor."""
    loc = node_loc(user)
    leaf = str(const.target).rsplit(".", 1)[-1]
    return f"{loc}.{leaf}" if loc else str(const.target)


def untie(program: Program, uses: Iterable[tuple[fx.Node, int]]) -> list[fx.Node]:
    """Give every constant read at `(user, arg index)` that other nodes also read one copy per user.

    The user whose module path names the constant (`lm_head` for `lm_head.weight`) keeps it; the
    others get a copy named after their own module (`model.embed_tokens.weight`), so writing
    back finds the tensor under the name the model uses. Returns the users given a copy.
    """
    moved: list[fx.Node] = []
    seen: set[fx.Node] = set()
    for user, index in uses:
        const = constant_arg(user, index)
        if const is None or const in seen or len(const.users) < 2:
            continue
        seen.add(const)
        users = list(const.users)
        keeper = next(
            (u for u in users if _preferred_target(u, const) == str(const.target)), users[0]
        )
        value = program.weights.get(str(const.target))
        for other in users:
            if other is keeper:
                continue
            target = program.unique_target(_preferred_target(other, const))
            copy = program.constant_node(target, value.detach().clone(), before=const)
            other.replace_input_with(const, copy)
            moved.append(other)
            log.debug("untied %s: %s now reads %s", const.target, other.name, target)
    return moved


def _get(program: Program, node: fx.Node) -> torch.Tensor:
    return program.weights.get(str(node.target))


def _set(program: Program, node: fx.Node, value: torch.Tensor, like: torch.Tensor) -> None:
    program.weights.set(str(node.target), value.to(like.dtype))


def _update(program: Program, node: fx.Node, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace constant `node` by `fn(value as float64)`, stored back in its dtype."""
    old = _get(program, node)
    _set(program, node, fn(old.detach().double()), old)


# -- norms and rotations ---------------------------------------------------------------------------
def fuse_norm(program: Program, norm: NormScale) -> bool:
    """Multiply the readers' columns by the norm scale (`c + w` for `x * (c + w)` norms), and set
    the scale to one (`w = 1 - c`), so the norm output is the plain normalized stream.

    A norm bias `b` (LayerNorm) goes where it keeps the model's form: into the readers' biases
    (`c -> c + W b`) when each reader has one; otherwise it stays in the norm as `b / s` (the
    readers' `W diag(s)` turn it back into `W b`), which the caller must then rotate with the
    stream; where a zero scale meets a nonzero bias, the readers are given biases.

    Returns:
        Whether the norm keeps a bias (to be rotated like the stream, `b -> b Q`).
    """
    carrier = norm.carrier
    stored = _get(program, carrier.weight)
    weight = stored.detach().double()
    scale = (weight + carrier.offset).reshape(-1)
    kept = _fuse_bias(program, norm, scale) if carrier.bias is not None else False
    for reader in norm.readers:
        const = constant_arg(reader, WEIGHT)
        assert const is not None
        _update(program, const, lambda w: w * scale)
    _set(program, carrier.weight, torch.full_like(weight, 1.0 - carrier.offset), stored)
    return kept


def _fuse_bias(program: Program, norm: NormScale, scale: torch.Tensor) -> bool:
    """Move a norm's bias out of the norm's scale (see `fuse_norm`); True if it stays there."""
    assert norm.carrier.bias is not None
    stored = _get(program, norm.carrier.bias)
    bias = stored.detach().double().reshape(-1)
    if not bool(bias.any()):
        return False
    all_biased = all(constant_arg(r, bias_index(r)) is not None for r in norm.readers)
    if all_biased or bool((bias[scale == 0]).any()):
        for reader in norm.readers:
            weight = constant_arg(reader, WEIGHT)
            assert weight is not None
            stored_w = _get(program, weight)
            w = stored_w.detach().double()
            const = constant_arg(reader, bias_index(reader))
            if const is None:
                loc = node_loc(reader) or reader.name
                zeros = torch.zeros(w.shape[:-1], dtype=stored_w.dtype)  # [E, N]: a stack
                const = program.constant_node(program.unique_target(f"{loc}.bias"), zeros, reader)
                at = bias_index(reader)
                reader.args = (*reader.args[:at], const, *reader.args[at + 1 :])
                log.info("%s: given a bias (the LayerNorm bias before it)", loc)
            _update(program, const, lambda c, w=w: c + w @ bias)
        _set(program, norm.carrier.bias, torch.zeros_like(bias).reshape(stored.shape), stored)
        return False
    kept = torch.where(scale == 0, torch.zeros_like(bias), bias / scale)
    _set(program, norm.carrier.bias, kept.reshape(stored.shape), stored)
    return True


def rotate_bias(program: Program, bias: fx.Node, q: torch.Tensor) -> None:
    """`b -> b Q`: a per-channel constant added to the stream's channels (a norm bias)."""
    _update(program, bias, lambda b: (b.reshape(-1) @ q).reshape(b.shape))


def rotate_input(program: Program, linear: fx.Node, q: torch.Tensor) -> None:
    """`W -> W Q`: the linear reads `x Q` and computes the same output."""
    const = constant_arg(linear, WEIGHT)
    assert const is not None
    _update(program, const, lambda w: w @ q)


def rotate_output(program: Program, linear: fx.Node, q: torch.Tensor) -> None:
    """`W -> Q^T W`, `b -> Q^T b`: the linear's output becomes `y Q`."""
    const = constant_arg(linear, WEIGHT)
    assert const is not None
    _update(program, const, lambda w: q.T @ w)
    bias = constant_arg(linear, bias_index(linear))
    if bias is not None:
        _update(program, bias, lambda b: b @ q)


def rotate_embedding(program: Program, embedding: fx.Node, q: torch.Tensor) -> None:
    """`E -> E Q`: every looked-up row comes out rotated."""
    const = constant_arg(embedding, 0)
    assert const is not None
    _update(program, const, lambda e: e @ q)


# -- attention heads ------------------------------------------------------------------------------
def head_dim(group: LinearGroup) -> int | None:
    """The head size on the ov path (the value's last dim at the attention), if the path between
    v and o only moves elements and attends; None when it does anything else (a per-channel
    factor would not commute with a rotation)."""
    node = group.input
    found: int | None = None
    while node is not group.producer:
        t = node.target
        if t is aten.scaled_dot_product_attention.default:
            node = node.args[2]  # type: ignore[assignment]
            found = int(node.meta["val"].shape[-1])
        elif t in (aten.matmul.default, aten.bmm.default):
            node = node.args[1]  # type: ignore[assignment]
            found = int(node.meta["val"].shape[-1])
        elif t in MOVES or (t is aten.mul.Tensor and isinstance(node.args[1], (int, float))):
            node = node.args[0]  # type: ignore[assignment]
        elif t is operator.getitem and node.args[0].target in SPLITS:  # type: ignore[union-attr]
            node = node.args[0].args[0]  # type: ignore[union-attr,assignment]
        else:
            return None
    return found


def head_blocks(group: LinearGroup, size: int) -> torch.Tensor | None:
    """First producer row of each target head block when every block of `size` target input
    channels reads `size` consecutive producer rows in order (also under grouped-query sharing);
    None otherwise."""
    cmap = group.channel_map
    if cmap is None or cmap.numel() % size:
        return None
    blocks = cmap.reshape(-1, size)
    if not bool((blocks - blocks[:, :1] == torch.arange(size)).all()):
        return None
    return blocks[:, 0]


def rotate_heads(
    program: Program, group: LinearGroup, h: torch.Tensor, starts: torch.Tensor
) -> None:
    """Rotate each head of the value by `h` (v rows: `H^T W_v`, bias too) and undo it in o_proj's
    input columns (`W_o H`), so attention output `z_h H` meets `W_o H` per head."""
    size = h.shape[0]
    producer = group.producer
    assert producer is not None
    rows = sorted({int(s) for s in starts.tolist()})

    def left(w: torch.Tensor) -> torch.Tensor:
        out = w.clone()
        for r in rows:
            out[r : r + size] = h.T @ w[r : r + size]
        return out

    const = constant_arg(producer, WEIGHT)
    assert const is not None
    _update(program, const, left)
    bias = constant_arg(producer, BIAS)
    if bias is not None:
        _update(program, bias, lambda b: left(b[:, None])[:, 0])
    for target in group.targets:
        t_const = constant_arg(target, WEIGHT)
        assert t_const is not None
        _update(program, t_const, lambda w: (w.reshape(w.shape[0], -1, size) @ h).reshape(w.shape))
