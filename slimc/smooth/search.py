"""Searched smoothing scales: token samples, fake quantizers, the error metric, and the layer-wise driver."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from slimc.analyses.linear_groups import LinearGroup
from slimc.pass_base import OptionError, Pass
from slimc.program import Program
from slimc.quant.qparams import qparams_from_minmax, quantize_weight
from slimc.quant.scheme import TensorQuantSpec
from slimc.quant.ssz import ssz_quantize_weight

log = logging.getLogger(__name__)

ActQuant = Literal["per-token", "per-tensor", "none"]
K = TypeVar("K")


# -- candidates ------------------------------------------------------------------------------
def grid(step: float) -> list[float]:
    """`0, step, 2*step, ...` up to 1, always ending at exactly 1.0 (rounded to 1e-9)."""
    if not 0.0 < step <= 1.0:
        raise ValueError(f"grid step must be in (0, 1], got {step}")
    n = math.floor(1.0 / step + 1e-9)
    values = [round(i * step, 9) for i in range(n + 1)]
    if values[-1] < 1.0 - 1e-9:
        values.append(1.0)
    return values


def argmin_later(
    candidates: Iterable[K], error: Callable[[K], float], best: tuple[K, float] | None = None
) -> tuple[K, float]:
    """The candidate of lowest error; ties go to the later one (`<=`), as msModelSlim's search.

    `best`, when given, is the incumbent: a candidate replaces it only with an error `<=` its own.
    """
    for cand in candidates:
        err = error(cand)
        if best is None or err <= best[1]:
            best = (cand, err)
    if best is None:
        raise ValueError("no candidate to search")
    return best


# -- fake quantizers ---------------------------------------------------------------------------
def fake_quant_per_token(x: Tensor, bits: int = 8) -> Tensor:
    """Symmetric per-token (last dim) quantize-dequantize: scale = absmax / (2^(b-1) - 1)."""
    qmax = 2 ** (bits - 1) - 1
    lo, hi = torch.aminmax(x, dim=-1)
    scale, _ = qparams_from_minmax(lo, hi, -qmax - 1, qmax, True)
    scale = scale.unsqueeze(-1)
    return (x / scale).round_().clamp_(-qmax - 1, qmax).mul_(scale)


def fake_quant_per_tensor(x: Tensor, lo: Tensor, hi: Tensor, bits: int = 8) -> Tensor:
    """Asymmetric per-tensor quantize-dequantize with the static range `[lo, hi]`."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale, zp = qparams_from_minmax(lo, hi, qmin, qmax, False)
    zpf = zp.to(torch.float32)
    return (x / scale).add_(zpf).round_().clamp_(qmin, qmax).sub_(zpf).mul_(scale)


def minmax_weight(w: Tensor, spec: TensorQuantSpec) -> Tensor:
    """MinMax quantize-dequantize of a weight [N, K] per output channel or per group along K.

    Equal to `quantize_weight(w, spec).dequantize()`, with fewer temporaries.
    """
    n, k = w.shape
    group = spec.group_size if spec.granularity == "group" else k
    if spec.granularity not in ("channel", "group") or k % group:
        return quantize_weight(w, spec).dequantize(torch.float32)  # raises the usual error
    blocks = w.to(torch.float32).reshape(n, k // group, group)
    lo, hi = torch.aminmax(blocks, dim=-1)
    scale, zp = qparams_from_minmax(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    scale = scale.unsqueeze(-1)
    q = blocks / scale
    if not spec.symmetric:
        zpf = zp.to(torch.float32).unsqueeze(-1)
        q.add_(zpf).round_().clamp_(spec.qmin, spec.qmax).sub_(zpf)
    else:
        q.round_().clamp_(spec.qmin, spec.qmax)
    return q.mul_(scale).reshape(n, k)


WeightQuantizer = Callable[[Tensor, TensorQuantSpec], Tensor]


def ssz_weight(w: Tensor, spec: TensorQuantSpec) -> Tensor:
    """SSZ quantize-dequantize of a weight [N, K] (least-squares refit of the MinMax range)."""
    return ssz_quantize_weight(w, spec).dequantize(torch.float32)


WEIGHT_METHODS: dict[str, WeightQuantizer] = {"minmax": minmax_weight, "ssz": ssz_weight}
"""Weight quantize-dequantize functions by `weight-method` name."""


def relative_error(y_hat: Tensor, y: Tensor, y_norm: float | None = None) -> float:
    """RMSE(y_hat - y) / RMS(y) (0 when both are zero); overwrites `y_hat`."""
    ref = float(torch.linalg.vector_norm(y)) if y_norm is None else y_norm
    err = float(torch.linalg.vector_norm(y_hat.sub_(y)))
    return err / ref if ref > 0 else err


# -- collected inputs --------------------------------------------------------------------------
@dataclass
class GroupInput:
    """A group's input over the calibration set: exact per-channel statistics over every token,
    and a token sample (rows of `[T, C]`, float32) for measuring candidate errors."""

    channels: int
    absmax: Tensor
    abssum: Tensor
    min: Tensor
    max: Tensor
    tokens: int = 0
    parts: list[Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, channels: int) -> GroupInput:
        inf = torch.full((channels,), math.inf, dtype=torch.float64)
        zeros = torch.zeros(channels, dtype=torch.float64)
        return cls(channels, zeros, zeros.clone(), inf, -inf)

    def update(self, x: Tensor, keep: Tensor | None) -> None:
        """Add one sample's activation; `keep` = token rows to sample (None: all of them)."""
        flat = x.detach().reshape(-1, self.channels)
        f64 = flat.double()
        a = f64.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(0))
        self.abssum = self.abssum + a.sum(0)
        self.min = torch.minimum(self.min, f64.amin(0))
        self.max = torch.maximum(self.max, f64.amax(0))
        self.tokens += flat.shape[0]
        rows = flat if keep is None else flat[keep]
        if rows.shape[0]:
            self.parts.append(rows.to(torch.float32).clone())

    @property
    def absmean(self) -> Tensor:
        return self.abssum / max(self.tokens, 1)

    @property
    def sample(self) -> Tensor:
        """The kept tokens `[T, C]` (float32)."""
        if not self.parts:
            return torch.zeros(0, self.channels)
        if len(self.parts) > 1:
            self.parts = [torch.cat(self.parts)]
        return self.parts[0]


class TokenSampler:
    """Which tokens of each calibration sample to keep: `max_tokens` spread evenly over the
    samples, chosen at random with a fixed seed (the same rows for every group of a sample)."""

    def __init__(self, max_tokens: int, n_samples: int, seed: int = 0) -> None:
        self.max_tokens = max_tokens
        self.n_samples = max(n_samples, 1)
        self.seed = seed
        self._cache: dict[tuple[int, int], Tensor | None] = {}

    def quota(self, index: int) -> int:
        """Tokens to keep from sample `index` (-1: all)."""
        if self.max_tokens < 0:
            return -1
        base, extra = divmod(self.max_tokens, self.n_samples)
        return base + (1 if index < extra else 0)

    def indices(self, index: int, length: int) -> Tensor | None:
        """Sorted row indices to keep out of `length` tokens, or None for all of them."""
        key = (index, length)
        if key not in self._cache:
            q = self.quota(index)
            if q < 0 or q >= length:
                self._cache[key] = None
            else:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
                self._cache[key] = torch.randperm(length, generator=gen)[:q].sort().values
        return self._cache[key]


# -- the measured error of one candidate scale ------------------------------------------------
@dataclass
class ScaleEvaluator:
    """Relative output error of a group's linears after smoothing by a candidate scale.

    For a per-source-channel scale `s`: `Y_hat = Qa(X / s) @ Qw(W * s)^T` against `Y = X W^T`
    on the kept tokens, all targets' outputs concatenated. `per-tensor` activations use the
    range of `X / s` over every calibration token (what a static MinMax observer would see).
    """

    group: LinearGroup
    inputs: GroupInput
    weight: Tensor
    act_quant: ActQuant
    weight_quant: Callable[[Tensor], Tensor]
    act_bits: int = 8
    evaluations: int = 0

    def __post_init__(self) -> None:
        self.x = self.inputs.sample
        self.weight = self.weight.to(torch.float32)
        self._weight64 = self.weight.double()  # each candidate scales it in float64
        self.y = self.x @ self.weight.T
        self.y_norm = float(torch.linalg.vector_norm(self.y))

    def __call__(self, scale: Tensor) -> float:
        self.evaluations += 1
        s_in = self.group.expand(scale.double())
        s = s_in.to(torch.float32)
        xs = self.x / s
        if self.act_quant == "per-token":
            xs = fake_quant_per_token(xs, self.act_bits)
        elif self.act_quant == "per-tensor":
            lo = (self.inputs.min / s_in).min()
            hi = (self.inputs.max / s_in).max()
            xs = fake_quant_per_tensor(xs, lo, hi, self.act_bits)
        wq = self.weight_quant((self._weight64 * s_in).to(torch.float32))
        return relative_error(xs @ wq.T, self.y, self.y_norm)


def check_search_options(
    pass_name: str, grid_step: float, max_tokens: int, **fractions: Any
) -> None:
    """Refuse a grid step outside (0, 1], max-tokens other than -1 or >= 1, and fixed
    exponents (`alpha=...`, `beta=...`, None = searched) outside [0, 1]."""
    if not 0.0 < grid_step <= 1.0:
        raise OptionError(
            f"pass {pass_name!r}: option 'grid-step' must be in (0, 1], got {grid_step}"
        )
    if max_tokens == 0 or max_tokens < -1:
        raise OptionError(
            f"pass {pass_name!r}: option 'max-tokens' must be >= 1 (or -1 for all), got {max_tokens}"
        )
    for key, value in fractions.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise OptionError(f"pass {pass_name!r}: option {key!r} must be in [0, 1], got {value}")


def record_errors(p: Pass, program: Program, errors: list[tuple[float, float]]) -> None:
    """Pass statistics: mean relative error of the searched groups before and after smoothing."""
    if errors:
        m = len(errors)
        p.stat(program, "mean relative error unsmoothed", sum(e[0] for e in errors) / m)
        p.stat(program, "mean relative error smoothed", sum(e[1] for e in errors) / m)
