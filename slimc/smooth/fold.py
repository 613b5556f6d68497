"""Folding a per-channel smoothing scale into a group's producer and consumers (exact in float)."""

from __future__ import annotations

import torch
from torch import fx

from slimc.analyses.activation_stats import ActivationStats
from slimc.analyses.linear_groups import LinearGroup
from slimc.linear_select import bias_of
from slimc.program import Program


def _weight(program: Program, node: object) -> torch.Tensor:
    assert isinstance(node, fx.Node)
    return program.weights.get(str(node.target))


def _bias_node(linear: fx.Node) -> fx.Node | None:
    bias = bias_of(linear)
    return bias if isinstance(bias, fx.Node) else None


def _divide_rows(t: torch.Tensor, s: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """`t / s` along dim 0, or only `t[rows] / s` with the other rows kept bit for bit."""
    scale = s.reshape(-1, *([1] * (t.dim() - 1)))
    if rows is None:
        return (t.double() / scale).to(t.dtype)
    out = t.detach().clone()
    out[rows] = (t[rows].double() / scale).to(t.dtype)
    return out


def weight_column_absmax(program: Program, group: LinearGroup) -> torch.Tensor:
    """Per input channel: max |W[:, c]| over every target linear of the group (float64)."""
    cols = [_rows(_weight(program, t.args[1])).double().abs().amax(0) for t in group.targets]
    return torch.stack(cols).amax(0)


def _rows(w: torch.Tensor) -> torch.Tensor:
    """A linear's weight [N, K], or an expert stack [E, N, K] as its E * N rows."""
    return w.detach().reshape(-1, w.shape[-1])


def target_weight(program: Program, group: LinearGroup) -> torch.Tensor:
    """The targets' weights stacked along the output dim ([sum N, K], float64)."""
    return torch.cat([_rows(_weight(program, t.args[1])).double() for t in group.targets])


def fold_scale(
    program: Program,
    group: LinearGroup,
    scale: torch.Tensor,
    stats: ActivationStats | None = None,
) -> None:
    """Make the group's input `x / s` and its targets `W * s`, so outputs are unchanged.

    `scale` has one entry per source channel (`group.source_channels()`): the norm's channels
    for norm-linear, the producer's output channels otherwise. The division is folded into the
    norm weight and bias (`x * (c + w)` norms keep their offset `c`) or into the producer's rows
    and bias: only the rows in `group.rows` when the targets read part of a fused producer (the
    v rows of a qkv projection), the others untouched. Arithmetic is float64, stored back in
    each constant's dtype.
    """
    s = scale.detach().double()
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"smoothing scale for {group.name} must be finite and positive")
    s_in = group.expand(s)
    weights = program.weights
    for t in group.targets:
        w_node = t.args[1]
        w = _weight(program, w_node)
        weights.set(str(w_node.target), (w.double() * s_in).to(w.dtype))  # type: ignore[union-attr]
    if group.carrier is not None:
        c = group.carrier
        w = _weight(program, c.weight)
        new = (w.double() + c.offset) / s.reshape(w.shape) - c.offset
        weights.set(str(c.weight.target), new.to(w.dtype))
        if c.bias is not None:
            b = _weight(program, c.bias)
            weights.set(str(c.bias.target), (b.double() / s.reshape(b.shape)).to(b.dtype))
    else:
        assert group.producer is not None
        p = group.producer
        rows = group.rows  # None: every row; else only the part the targets read (fused qkv)
        w = _weight(program, p.args[1])
        weights.set(str(p.args[1].target), _divide_rows(w, s, rows))  # type: ignore[union-attr]
        bias = _bias_node(p)
        if bias is not None:
            b = _weight(program, bias)
            weights.set(str(bias.target), _divide_rows(b, s, rows))
    if stats is not None and group.input in stats:
        stats[group.input].divide(s_in)
