"""Unstructured pruning of a weight against its input Hessian by ADMM, and magnitude pruning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DEAD_FLOOR = 1e-8
"""diag(H) entries are raised to this fraction of their mean before normalizing (dead inputs)."""


def prune_count(numel: int, ratio: float) -> int:
    """How many of `numel` weights a `ratio` prunes: `round(ratio * numel)` (half to even)."""
    return round(ratio * numel)


def smallest_mask(score: Tensor, count: int) -> Tensor:
    """A bool mask of `score`'s shape, False at the `count` smallest entries (ties by position)."""
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if count > 0:
        order = torch.argsort(score.reshape(-1), stable=True)
        keep[order[:count]] = False
    return keep.reshape(score.shape)


def magnitude_prune(w: Tensor, ratio: float) -> Tensor:
    """`w` with the `round(ratio * numel)` entries of smallest |w| set to zero."""
    return w * smallest_mask(w.abs(), prune_count(w.numel(), ratio))


def output_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """`tr((W - W_hat) H (W - W_hat)^T)`: the squared output error summed over the rows of H."""
    d = w.detach().to(torch.float64) - w_hat.detach().to(torch.float64)
    return float(torch.einsum("nk,kj,nj->", d, hessian.to(torch.float64), d))


def relative_output_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """`output_error(w, w_hat, H) / tr(W H W^T)` (0 when the output is all zero)."""
    signal = output_error(w, torch.zeros_like(w), hessian)
    return output_error(w, w_hat, hessian) / signal if signal > 0 else 0.0


@dataclass(frozen=True)
class AdmmConfig:
    """ADMM pruning knobs (msModelSlim's float sparse defaults).

    Attributes:
        ratio: fraction of the weights set to zero, over the whole matrix.
        iters: ADMM iterations.
        mask_iters: the mask is recomputed in the first `mask_iters` iterations, then frozen.
        rho: the penalty added to the normalized Hessian in each update.
        damp: `damp * mean(diag H~)` is added to the normalized Hessian's diagonal first.
    """

    ratio: float = 0.3
    iters: int = 20
    mask_iters: int = 15
    rho: float = 1.0
    damp: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"sparse ratio must be in [0, 1), got {self.ratio}")
        if self.iters < 1 or not 0 <= self.mask_iters <= self.iters:
            raise ValueError(f"need iters >= 1 and 0 <= mask-iters <= iters, got {self}")
        if self.rho <= 0 or self.damp < 0:
            raise ValueError(f"need rho > 0 and damp >= 0, got {self}")


def admm_prune(w: Tensor, hessian: Tensor, config: AdmmConfig | None = None) -> Tensor:
    """Prune `w` [N, K] to `round(ratio * N * K)` zeros, minimizing `tr(dW H dW^T)` by ADMM.

    With `d = sqrt(diag H)`, the problem is solved in normalized coordinates `H~ = D^-1 H D^-1`
    (plus `damp * mean(diag H~)` on the diagonal) and `W~ = (W D)^T` [K, N]. Each iteration:
    in the first `mask_iters`, the mask drops the smallest |W~ + L| over the whole matrix;
    `Z = (W~ + L) * M`, `L += W~ - Z`, `W~ = (H~ + rho I)^-1 (H~ W~_0 + rho (Z - L))`. The
    result is `((W~ + L) * M)^T / d`: exactly the masked entries are zero (others are non-zero
    unless the iteration lands on zero). Input channels that never saw a non-zero input get a
    tiny `d`, so they are pruned first. Computed in float32; returned in `w`'s dtype.
    (Boza, "Fast and Effective Weight Update for Pruned Large Language Models", 2024.)

    Raises:
        ValueError: shapes do not match, or `w` / `hessian` hold NaN or inf.
    """
    cfg = config or AdmmConfig()
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"weight {tuple(w.shape)} and Hessian {tuple(hessian.shape)} do not match")
    if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(hessian).all())):
        raise ValueError("weight or Hessian holds NaN or inf")
    h = hessian.detach().to(torch.float32)
    diag = torch.diagonal(h).clamp(min=0)
    floor = float(diag.mean()) * DEAD_FLOOR
    d = diag.clamp(min=floor if floor > 0 else 1.0).sqrt()
    hn = h / d[:, None] / d[None, :]
    hn.diagonal().add_(cfg.damp * float(hn.diagonal().mean()))
    w0 = (w.detach().to(torch.float32) * d).T.contiguous()
    target = hn @ w0
    system = hn.clone()
    system.diagonal().add_(cfg.rho)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info):
        raise ValueError("the damped Hessian is not positive definite")
    inverse = torch.cholesky_inverse(chol)
    count = prune_count(w.numel(), cfg.ratio)
    wt, lam = w0.clone(), torch.zeros_like(w0)
    mask = smallest_mask(w0.abs(), count)
    for it in range(cfg.iters):
        if it < cfg.mask_iters:
            mask = smallest_mask((wt + lam).abs(), count)
        z = (wt + lam) * mask
        lam += wt - z
        wt = inverse @ (target + cfg.rho * (z - lam))
    out = ((wt + lam) * mask).T / d
    return out.to(w.dtype)
