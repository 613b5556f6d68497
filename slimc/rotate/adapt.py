"""Learning an orthogonal rotation that lowers per-token activation quantization error."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SCALE_MIN = 1e-5
"""Lower bound of a token's quantization scale (msModelSlim's)."""

NULL_TOL = 1e-10
"""Singular values below this fraction of the largest count as zero in `procrustes`."""


def fake_quant_per_token(x: Tensor, bits: int) -> Tensor:
    """Symmetric per-token (per-row) fake quantization of `x` [T, K] to signed `bits`-bit ints.

    `scale = max(max|row| / (2^(b-1) - 1), 1e-5)`, `q = clamp(round(x / scale)) * scale`.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=SCALE_MIN)
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


def quant_error(x: Tensor, bits: int) -> float:
    """`||x - Q(x)||_F^2 / numel` for the per-token fake quantization Q."""
    return float((x - fake_quant_per_token(x, bits)).pow(2).mean())


def procrustes(c: Tensor) -> Tensor:
    """The orthogonal R maximizing `tr(R^T C)`, i.e. minimizing `||A R - B||_F` for `C = A^T B`.

    R is the polar factor `U V^T` of `C = U S V^T` (one SVD). Where C is rank-deficient (fewer
    calibration rows than channels) the maximizer is not unique: on the null space the
    completion closest to the identity is chosen, so directions the data does not span are
    rotated as little as possible (and `C = 0` gives `R = I`).
    """
    u, s, vh = torch.linalg.svd(c)
    top = float(s[0]) if s.numel() else 0.0
    rank = int((s > top * NULL_TOL).sum()) if top > 0 else 0
    r = u[:, :rank] @ vh[:rank]
    if rank < c.shape[0]:
        u0, v0 = u[:, rank:], vh[rank:].T
        # maximize tr(U0 W V0^T) over orthogonal W: W = polar(U0^T V0)
        pu, _, pvh = torch.linalg.svd(u0.T @ v0)
        r = r + u0 @ (pu @ pvh) @ v0.T
    return r


@dataclass
class LearnedRotation:
    """What `learn_rotation` found.

    Attributes:
        rotation: the best R (float64, orthogonal); the identity when no step improved.
        losses: the loss at the start (R = I) and after each step taken.
        best_step: index into `losses` of the best R (0 = the start).
    """

    rotation: Tensor
    losses: list[float] = field(default_factory=list)
    best_step: int = 0

    @property
    def initial(self) -> float:
        return self.losses[0]

    @property
    def best(self) -> float:
        return self.losses[self.best_step]

    @property
    def steps(self) -> int:
        return len(self.losses) - 1

    @property
    def reduction(self) -> float:
        """How much lower the best loss is than the start, in percent."""
        return 100.0 * (self.initial - self.best) / self.initial if self.initial > 0 else 0.0


def learn_rotation(
    a: Tensor, bits: int = 4, steps: int = 20, patience: int = 5, min_steps: int = 6
) -> LearnedRotation:
    """Learn an orthogonal R that lowers the per-token quantization error of `a R`.

    Alternates (msModelSlim's adapt rotation, stage 1): `B = Q(A R)` (per-token symmetric fake
    quantization), `R_step = procrustes((A R)^T B)`, `R <- R R_step`; the loss is
    `||A R - Q(A R)||_F^2 / numel`. The best R seen is kept (the iteration is not monotone);
    it stops after `patience` steps without improvement once `min_steps` steps are done.

    Args:
        a: the rows to fit, [T, K] (float64 recommended; any float dtype is computed in float64).
        bits: activation bits of the simulated quantizer.
        steps: maximum number of steps.
        patience: stop after this many steps without a new best...
        min_steps: ...once at least this many steps were taken.

    Returns:
        the best rotation and the loss history.
    """
    a = a.to(torch.float64)
    k = a.shape[1]
    r = torch.eye(k, dtype=torch.float64)
    ar = a
    result = LearnedRotation(r.clone(), [quant_error(ar, bits)], 0)
    stale = 0
    for step in range(1, steps + 1):
        r_step = procrustes(ar.T @ fake_quant_per_token(ar, bits))
        r = r @ r_step
        ar = a @ r
        loss = quant_error(ar, bits)
        result.losses.append(loss)
        log.debug("adapt rotation: step %d loss %.6g", step, loss)
        if loss < result.best:
            result.rotation = r.clone()
            result.best_step = step
            stale = 0
        else:
            stale += 1
        if step >= min_steps and stale >= patience:
            break
    return result


def spread(total: int, parts: int) -> list[int]:
    """`total` split into `parts` non-negative integers that differ by at most one."""
    if parts <= 0:
        return []
    return [(total * (i + 1)) // parts - (total * i) // parts for i in range(parts)]


def pick_rows(x: Tensor, count: int) -> Tensor:
    """`count` rows of `x` [..., K] spread evenly (the middle of each of `count` equal spans)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if count >= n:
        return rows
    if count <= 0:
        return rows[:0]
    index = torch.tensor([((2 * i + 1) * n) // (2 * count) for i in range(count)])
    return rows[index]
