"""GPTQ: quantize a weight column by column, pushing each column's error onto the columns left."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from slimc.quant.qparams import QuantizedWeight, calculate_qparams
from slimc.quant.scheme import TensorQuantSpec

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 8
"""How many times the dampening is multiplied by 10 when the Hessian is not positive definite."""

FLOAT32_FACTOR_FROM_K = 16384
"""Input width from which the Hessian is factored in float32 instead of float64: two float64
K x K copies would take 13 GB at K = 28672 (a 70B model's down_proj), 3.3 GB at K = 14336."""


@dataclass(frozen=True)
class GPTQResult:
    """A GPTQ-quantized weight and what the solve took.

    Attributes:
        weight: the quantized weight (integer codes, scales, zero points).
        damp: the dampening finally added to the Hessian's diagonal (relative to its mean).
        dead_columns: input channels that never saw a non-zero input (their weights are zeroed).
    """

    weight: QuantizedWeight
    damp: float
    dead_columns: int


def hessian_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """The layer output error GPTQ minimizes: `tr((W - W_hat) H (W - W_hat)^T) / 2`.

    A float32 product summed in float64 (relative error about 1e-9 against float64 throughout,
    at half the cost: it is computed twice per linear for the statistics).
    """
    d = w.detach().to(torch.float32) - w_hat.detach().to(torch.float32)
    return float(0.5 * ((d @ hessian.to(torch.float32)) * d).sum(dtype=torch.float64))


def _inverse_cholesky(build: Callable[[], Tensor], percdamp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of `(H + damp * mean(diag H) * I)^-1`, retrying larger damps.

    `build` makes a fresh copy of H for each attempt, which is damped in place and freed once
    factored: at most two K x K matrices are alive at once (K = 14336 in float64: 3.3 GB).

    Raises:
        ValueError: the Hessian stays indefinite after `MAX_DAMP_RETRIES` retries.
    """
    mean_diag: float | None = None
    damp = percdamp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        h = build()
        if mean_diag is None:
            mean_diag = float(torch.diagonal(h).mean())
        h.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        del h
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                if attempt:
                    log.info("gptq: Hessian needed dampening %.3g (asked %.3g)", damp, percdamp)
                return upper, damp
        damp = damp * 10 if damp > 0 else 1e-6
    raise ValueError(
        f"Hessian is not positive definite even with dampening {damp / 10:.3g} x mean(diag H)"
    )


def shrunk_range(
    block: Tensor, spec: TensorQuantSpec, steps: int, min_ratio: float = 0.75, norm: float = 2.4
) -> tuple[Tensor, Tensor]:
    """Per-row scale / zero point of `block` [N, G], its MinMax range shrunk where that helps.

    Tries the range `[r * min, r * max]` for `steps` ratios r evenly spaced from 1 down to
    `min_ratio`, and keeps, per row, the one with the smallest `sum |w - Q(w)|^norm` (a norm a
    little above 2 weighs the large errors of clipped outliers more). `steps <= 1` is MinMax.
    """
    lo, hi = torch.aminmax(block, dim=1)
    best_s, best_z = calculate_qparams(lo, hi, spec)
    if steps <= 1:
        return best_s, best_z
    best_err = torch.full_like(best_s, float("inf"))
    for i in range(steps):
        ratio = 1.0 - (1.0 - min_ratio) * i / (steps - 1)
        s, z = calculate_qparams(lo * ratio, hi * ratio, spec)
        zf = z.to(torch.float32).unsqueeze(1)
        q = torch.clamp(torch.round(block / s.unsqueeze(1)) + zf, spec.qmin, spec.qmax)
        err = ((q - zf) * s.unsqueeze(1) - block).abs().pow(norm).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


class _GroupParams:
    """Scale / zero point of each group along K, filled as the sweep reaches the group."""

    def __init__(self, n: int, groups: int, range_steps: int) -> None:
        self.scale = torch.zeros(n, groups, dtype=torch.float32)
        self.zero_point = torch.zeros(n, groups, dtype=torch.int32)
        self.range_steps = range_steps

    def set(self, g: int, block: Tensor, spec: TensorQuantSpec) -> None:
        s, z = shrunk_range(block, spec, self.range_steps)
        self.scale[:, g] = s
        self.zero_point[:, g] = z

    def set_all(self, weight: Tensor, spec: TensorQuantSpec) -> None:
        """Every group's range from `weight` [N, K] at once (rows are independent)."""
        n, k = weight.shape
        groups = self.scale.shape[1]
        s, z = shrunk_range(weight.reshape(n * groups, k // groups), spec, self.range_steps)
        self.scale.copy_(s.reshape(n, groups))
        self.zero_point.copy_(z.reshape(n, groups))


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of one input Hessian, computed once for every weight that reads it.

    Attributes:
        perm: the column order (decreasing Hessian diagonal with act-order, else identity).
        hinv: float32 upper Cholesky factor of the damped inverse Hessian, in `perm` order.
        damp: the dampening finally added (relative to the diagonal's mean).
        dead: input channels whose diagonal is zero (never saw a non-zero input).
        act_order: whether `perm` is the act-order permutation.
    """

    perm: Tensor
    hinv: Tensor
    damp: float
    dead: Tensor
    act_order: bool


def hessian_factor(
    hessian: Tensor, percdamp: float = 0.01, act_order: bool = False
) -> HessianFactor:
    """Factor `hessian` [K, K] for `gptq_quantize`: dead channels set aside, columns ordered,
    damped, inverted and Cholesky-factored (in float64, or float32 from K =
    `FLOAT32_FACTOR_FROM_K`; the factor is kept in float32).

    Linears that read one input share one Hessian, so one factor serves all of them (q, k
    and v; gate and up): the result equals factoring it once per linear.

    Raises:
        ValueError: the Hessian is not square, holds NaN / inf, or cannot be made positive
            definite.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} is not square")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("weight or Hessian holds NaN or inf")
    k = hessian.shape[0]
    dtype = torch.float64 if k < FLOAT32_FACTOR_FROM_K else torch.float32
    diag = torch.diagonal(hessian).detach().to(dtype, copy=True)
    dead = diag == 0
    diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(k)
    dead_in_order = dead[perm]

    def build() -> Tensor:  # H in sweep order, widened, dead channels' diagonal set to 1
        ordered = hessian[perm[:, None], perm] if act_order else hessian
        h = ordered.detach().to(dtype, copy=True)
        del ordered
        h.diagonal()[dead_in_order] = 1.0
        return h

    upper, damp = _inverse_cholesky(build, percdamp)
    hinv = upper.to(torch.float32)
    del upper
    return HessianFactor(perm, hinv, damp, dead, act_order)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor | HessianFactor,
    spec: TensorQuantSpec,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    range_steps: int = 0,
) -> GPTQResult:
    """Quantize `weight` [N, K] with GPTQ against the input Hessian [K, K] (or its
    `hessian_factor`, which then fixes `percdamp` and `act_order`).

    Columns are quantized in blocks of `block_size`; inside a block each column's rounding error,
    scaled by the inverse Hessian, is subtracted from the block's remaining columns, and the
    block's accumulated error is applied to all later columns at once (lazy batch updates).
    Per-group ranges are taken when the sweep reaches a group, from the already-updated weights.
    With `act_order`, columns are visited by decreasing Hessian diagonal; group ranges are then
    fixed up front from the original weights so groups stay contiguous along K (the layout the
    fused kernels read). Dead input channels (zero diagonal) are zeroed. With `range_steps`
    > 1 each group's range is chosen by `shrunk_range` instead of MinMax.

    Raises:
        ValueError: shapes disagree, the weight or Hessian holds NaN / inf, the group size does
            not divide K, or the Hessian cannot be made positive definite.
    """
    shape = tuple((hessian.hinv if isinstance(hessian, HessianFactor) else hessian).shape)
    if weight.dim() != 2 or shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and Hessian {shape} do not match")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight or Hessian holds NaN or inf")
    n, k = weight.shape
    group = spec.group_size if spec.granularity == "group" else k
    if k % group:
        raise ValueError(f"group_size={group} does not divide the weight's input dim K={k}")
    factor = (
        hessian
        if isinstance(hessian, HessianFactor)
        else hessian_factor(hessian, percdamp, act_order)
    )
    act_order, perm, hinv = factor.act_order, factor.perm, factor.hinv
    w = weight.detach().to(torch.float32, copy=True)
    w[:, factor.dead] = 0.0

    params = _GroupParams(n, k // group, range_steps)
    if act_order:
        params.set_all(w, spec)  # static groups, from the original (dead-zeroed) weights
        w = w[:, perm]
    elif group == k:
        params.set(0, w, spec)

    codes = torch.zeros(n, k, dtype=torch.int32)
    qmin, qmax = spec.qmin, spec.qmax
    group_of = [int(c) // group for c in perm.tolist()]
    zero_points: Tensor | None = None  # as float32, once the groups are known
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        block = w[:, b0:b1].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            g = group_of[col]
            if not act_order and group < k and col % group == 0:
                ahead = torch.cat([block[:, i:], w[:, b1 : col + group]], dim=1)[:, :group]
                params.set(g, ahead, spec)
                zero_points = None
            if zero_points is None:
                zero_points = params.zero_point.to(torch.float32)
            scale, zp = params.scale[:, g], zero_points[:, g]
            column = block[:, i]
            q = torch.clamp(torch.round(column / scale) + zp, qmin, qmax)
            codes[:, col] = q.to(torch.int32)
            err = (column - (q - zp) * scale) / hblock[i, i]
            block[:, i:] -= err.unsqueeze(1) * hblock[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]

    if act_order:
        codes = codes[:, torch.argsort(perm)]
    zero_point = None if spec.symmetric else params.zero_point.to(torch.int8)
    qw = QuantizedWeight(
        qdata=codes.to(torch.int8), scale=params.scale, zero_point=zero_point, spec=spec
    )
    return GPTQResult(weight=qw, damp=factor.damp, dead_columns=int(factor.dead.sum()))
