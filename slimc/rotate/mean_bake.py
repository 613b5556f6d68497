"""Mean-baking: writers of a LayerNorm-read residual stream made mean-free, and rotations of it."""

from __future__ import annotations

import logging

import torch
from torch import fx

from slimc.analyses.residual_stream import ResidualStream
from slimc.ir.builder import constant_arg
from slimc.linear_select import bias_index
from slimc.program import Program
from slimc.rotate.fold import WEIGHT

log = logging.getLogger(__name__)


def _center(program: Program, const: fx.Node, dim: int) -> None:
    """Subtract the mean over `dim` (the hidden channels) from constant `const` (in float64)."""
    target = str(const.target)
    old = program.weights.get(target)
    value = old.detach().double()
    program.weights.set(target, (value - value.mean(dim, keepdim=True)).to(old.dtype))


def bake_means(program: Program, stream: ResidualStream) -> int:
    """Make every value written into the residual stream mean-free over the hidden channels.

    Embedding rows (token and learned positional tables) `E -> E - mean_c(E)`, the linears adding
    into the stream `W -> (I - 11^T/d) W` (each column loses its mean over the output channels)
    and their biases `b -> b - mean(b)`. The stream `x` becomes `x - mean(x)`: exact when every
    reader of the stream removes the channel mean first (`stream.mean_free_readers`: each
    LayerNorm computes the same output), which the caller checks. Shared constants must have
    been untied. Returns the number of constants changed.
    """
    changed = 0
    for embedding in stream.embeddings:
        table = constant_arg(embedding, 0)
        assert table is not None
        _center(program, table, -1)
        changed += 1
    for linear in stream.writers:
        weight = constant_arg(linear, WEIGHT)
        assert weight is not None
        _center(program, weight, -2)  # the output channels ([E, N, K] for an expert stack)
        changed += 1
        bias = constant_arg(linear, bias_index(linear))
        if bias is not None:
            _center(program, bias, -1)
            changed += 1
    log.debug("mean-baked %d constants writing the residual stream", changed)
    return changed


def keeping_ones(q: torch.Tensor) -> torch.Tensor:
    """`Q G`: the orthogonal `Q` followed by the Householder reflection `G` that takes `1 Q`
    back to `1`, so the result maps the all-ones direction to itself (`1 Q G = 1`).

    On every vector orthogonal to `1` and to `1 Q` the two agree; the reflection only turns the
    plane they span. With `u = 1 Q / sqrt(d)`, `v = 1 / sqrt(d)` and `w = u - v`:
    `G = I - 2 w^T w / |w|^2` (the identity when `u = v`). float64 in, float64 out.
    """
    q = q.double()
    d = q.shape[0]
    v = torch.full((d,), d**-0.5, dtype=torch.float64)
    w = v @ q - v
    norm2 = float(w @ w)
    if norm2 < 1e-24:
        return q
    return q - 2.0 * torch.outer(q @ w, w) / norm2
