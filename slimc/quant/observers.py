"""Calibration observers: running MinMax and histogram (L2 clip search) range estimators."""

from __future__ import annotations

import bisect
import logging
import math
from typing import Literal

import torch
from torch import Tensor

from slimc import distributed
from slimc.quant.qparams import calculate_qparams
from slimc.quant.scheme import TensorQuantSpec

logger = logging.getLogger(__name__)

__all__ = ["HistogramObserver", "MinMaxObserver"]


def _float32(x: Tensor) -> Tensor:
    """Detached float32 view (or copy) of x."""
    return x.detach().to(torch.float32)


def _check_finite(lo: Tensor, hi: Tensor, who: str) -> None:
    """ValueError when a batch's min or max is NaN or inf: min and max propagate NaN, so this
    finds any NaN or inf in the batch without a pass over it."""
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        raise ValueError(f"{who}: input contains NaN or inf")


class MinMaxObserver:
    """Running min/max of activations, per tensor or per last-dim channel.

    Granularity "tensor" tracks scalars (0-d tensors); "channel" tracks one min/max per entry of
    the last dim (shape [K], reducing over all leading dims). aggregation="max" keeps the running
    extreme over batches; "mean" averages the per-batch min and max.
    """

    def __init__(self, spec: TensorQuantSpec, aggregation: Literal["max", "mean"] = "max") -> None:
        if spec.granularity not in ("tensor", "channel"):
            raise ValueError(
                "MinMaxObserver supports 'tensor' or 'channel' granularity, "
                f"not {spec.granularity!r}"
            )
        if aggregation not in ("max", "mean"):
            raise ValueError(f"aggregation must be 'max' or 'mean', got {aggregation!r}")
        self.spec = spec
        self.aggregation = aggregation
        self.num_batches = 0
        self._min: Tensor | None = None
        self._max: Tensor | None = None

    @property
    def min_val(self) -> Tensor | None:
        """Aggregated minimum (None before the first update)."""
        if self._min is None or self.aggregation == "max":
            return self._min
        return self._min / self.num_batches

    @property
    def max_val(self) -> Tensor | None:
        """Aggregated maximum (None before the first update)."""
        if self._max is None or self.aggregation == "max":
            return self._max
        return self._max / self.num_batches

    def update(self, x: Tensor) -> None:
        """Fold one batch into the running statistics (empty tensors are ignored)."""
        xf = _float32(x)
        if xf.numel() == 0:
            return
        if self.spec.granularity == "tensor":
            cur_min, cur_max = torch.aminmax(xf)
        else:
            if xf.dim() == 0:
                raise ValueError("per-channel MinMaxObserver needs at least a 1-D input")
            cur_min, cur_max = torch.aminmax(xf.reshape(-1, xf.shape[-1]), dim=0)
            if self._min is not None and self._min.shape != cur_min.shape:
                raise ValueError(
                    "channel count changed between updates: "
                    f"{self._min.shape[0]} -> {cur_min.shape[0]}"
                )
        _check_finite(cur_min, cur_max, "MinMaxObserver.update")
        self.num_batches += 1
        if self._min is None or self._max is None:
            self._min, self._max = cur_min, cur_max
        elif self.aggregation == "max":
            self._min = torch.minimum(self._min, cur_min)
            self._max = torch.maximum(self._max, cur_max)
        else:  # running sums; divided by num_batches on read
            self._min = self._min + cur_min
            self._max = self._max + cur_max

    def all_reduce(self) -> None:
        """Fold in what the other calibration ranks observed (`slimc.distributed`); a no-op in
        one process."""
        if not distributed.active():
            return
        batches = distributed.reduce_count(self.num_batches, "observer batch counts")
        if batches == 0:
            return
        channels = 0 if self._min is None else self._min.numel()
        if self.spec.granularity == "channel":  # a rank that saw nothing still knows K
            channels = int(distributed.reduce_max(torch.tensor(channels), "channel counts"))
        shape = () if self.spec.granularity == "tensor" else (channels,)
        if self.aggregation == "max":
            inf = torch.full(shape, float("inf"))
            lo = self._min if self._min is not None else inf
            hi = self._max if self._max is not None else -inf
            self._min = distributed.reduce_min(lo, "observer minima")
            self._max = distributed.reduce_max(hi, "observer maxima")
        else:
            zero = torch.zeros(shape)
            self._min = distributed.reduce_sum(self._min if self._min is not None else zero)
            self._max = distributed.reduce_sum(self._max if self._max is not None else zero)
        self.num_batches = batches

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        """(scale float32, zero_point int32) of the min/max shape ([] or [K])."""
        if self.min_val is None or self.max_val is None:
            raise ValueError(
                "MinMaxObserver.calculate_qparams: no data observed; call update() first"
            )
        return calculate_qparams(self.min_val, self.max_val, self.spec)


class HistogramObserver:
    """Per-tensor running histogram plus an L2-error clip search (after torch.ao / msModelSlim).

    Bins lie on a fixed grid: bin i covers [i * w, (i + 1) * w) with w a power of two, at most
    `bins` bins between the smallest and largest value seen. When a batch widens the range past
    `bins` bins, w doubles and neighbouring bins merge pairwise, which is exact: the histogram
    is the one binning every value at the final w would give, whatever the order of the batches
    or the ranks they were split over. `calculate_qparams` searches a clip range [lo, hi] that
    minimises the histogram-estimated quantization noise (rounding inside + clipping outside).
    """

    STEP = 1e-5  # probability mass moved per search step
    CHUNK = 1 << 22  # values binned at a time (bounds the int64 index buffer)
    FINEST = 40  # the grid is never finer than max|x| * 2**-FINEST (constant inputs)
    MIN_EXPONENT = -100  # nor finer than 2**-100 (2**100 still scales float32 exactly)

    def __init__(self, spec: TensorQuantSpec, bins: int = 4096) -> None:
        if spec.granularity != "tensor":
            raise ValueError(
                f"HistogramObserver is per tensor only, got granularity {spec.granularity!r}"
            )
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        self.spec = spec
        self.bins = bins
        self.exponent = 0  # bin width 2**exponent
        self.first = 0  # grid index of histogram[0]
        self.histogram = torch.zeros(0, dtype=torch.float64)
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None

    # ------------------------------------------------------------------ accumulation

    @property
    def width(self) -> float:
        """The bin width, 2**exponent."""
        return math.ldexp(1.0, self.exponent)

    def _grid_exponent(self, lo: float, hi: float) -> int:
        """The smallest exponent whose grid spans [lo, hi] in at most `bins` bins (and no
        finer than FINEST bits below max |x|, nor than 2**MIN_EXPONENT): a function of lo and
        hi only, and never smaller for a wider range."""
        magnitude = max(abs(lo), abs(hi))
        e = max(math.frexp(magnitude)[1] - self.FINEST, self.MIN_EXPONENT)
        if hi > lo:
            e = max(e, math.frexp((hi - lo) / self.bins)[1] - 1)
        while math.floor(math.ldexp(hi, -e)) - math.floor(math.ldexp(lo, -e)) + 1 > self.bins:
            e += 1
        return e

    def _regrid(self, lo: float, hi: float) -> None:
        """Re-express the histogram on the grid of [lo, hi] (a range that contains the current
        one, so its bin width is the same or a power of two coarser and bins merge exactly)."""
        exponent = self._grid_exponent(lo, hi)
        first = math.floor(math.ldexp(lo, -exponent))
        span = math.floor(math.ldexp(hi, -exponent)) - first + 1
        old = torch.arange(self.histogram.numel(), dtype=torch.long) + self.first
        shift = min(exponent - self.exponent, 62)  # grid indices stay below 2**(FINEST + 1)
        index = torch.div(old, 1 << shift, rounding_mode="floor") - first
        self.histogram = torch.bincount(index, weights=self.histogram, minlength=span)
        self.exponent, self.first = exponent, first
        self.min_val, self.max_val = torch.tensor(lo), torch.tensor(hi)

    def _bin(self, x: Tensor) -> Tensor:
        """Counts of x's float32 values per bin of the current grid (x within [min_val,
        max_val]). Exact in float32: scaling by a power of two is exact, floor(v) and `first`
        are integers float32 holds, and their difference (< bins) is rounded to itself."""
        span = self.histogram.numel()
        counts = torch.zeros(span, dtype=torch.float64)
        inv, first = math.ldexp(1.0, -self.exponent), float(self.first)
        for chunk in x.split(self.CHUNK):
            index = (chunk * inv).floor_().sub_(first).to(torch.int32)
            counts += torch.bincount(index, minlength=span).to(torch.float64)
        return counts

    def update(self, x: Tensor) -> None:
        """Add one batch to the histogram, widening the grid when the range needs it."""
        xf = _float32(x).flatten()
        if xf.numel() == 0:
            return
        batch_min, batch_max = torch.aminmax(xf)
        _check_finite(batch_min, batch_max, "HistogramObserver.update")
        lo, hi = float(batch_min), float(batch_max)
        if self.min_val is None or self.max_val is None:
            self.exponent = self._grid_exponent(lo, hi)
        else:
            lo, hi = min(lo, float(self.min_val)), max(hi, float(self.max_val))
        self._regrid(lo, hi)
        self.histogram = self.histogram + self._bin(xf)

    # ------------------------------------------------------------------ clip search

    def _quantization_error(self, start_bin: int, end_bin: int) -> float:
        """L2 noise of quantizing the histogram with the range [start_bin, end_bin] (inclusive).

        With dst_nbins uniform quantization bins of width d spanning the clip range, let F(t) be
        the integral from the clip start to t of the squared distance to the nearest level (the
        outermost level beyond the range). Per source bin, assuming uniform density,
        error = density * (F(end) - F(begin)); F has a closed form per level.
        """
        width = self.width
        nlevels = self.spec.qmax - self.spec.qmin + 1
        d = width * (end_bin - start_bin + 1) / nlevels
        if d == 0.0:
            return 0.0
        edges = (torch.arange(self.histogram.numel() + 1, dtype=torch.float64) - start_bin) * width
        k = torch.clamp(torch.floor(edges / d), 0, nlevels - 1)
        u = edges - k * d - d / 2
        f = k * (d**3 / 12) + (u**3 + (d / 2) ** 3) / 3
        density = self.histogram / width
        return float((density * (f[1:] - f[:-1])).sum())

    def clip_range(self) -> tuple[float, float]:
        """(clip_min, clip_max) minimising the estimated L2 quantization error, within
        [min_val, max_val]."""
        if self.min_val is None or self.max_val is None:
            raise ValueError("HistogramObserver: no data observed; call update() first")
        lo, hi = float(self.min_val), float(self.max_val)
        if hi <= lo:
            return lo, hi
        csum = torch.cumsum(self.histogram, 0).tolist()
        total = csum[-1]
        alpha, beta = 0.0, 1.0
        start, end = 0, len(csum) - 1
        best = float("inf")
        evals = 0
        while alpha < beta:
            next_alpha, next_beta = alpha + self.STEP, beta - self.STEP
            # first bin whose cumulative mass reaches next_alpha (bounded by end)
            left = bisect.bisect_left(csum, next_alpha * total, start, end)
            # last bin whose cumulative mass stays within next_beta (bounded by start)
            right = bisect.bisect_right(csum, next_beta * total, start + 1, end + 1) - 1
            new_start, new_end = start, end
            if left - start > end - right:  # lower tail is sparser: its bound moves farther
                new_start, alpha = left, next_alpha
            else:
                new_end, beta = right, next_beta
            if (new_start, new_end) == (start, end):
                continue
            err = self._quantization_error(new_start, new_end)
            evals += 1
            if err > best:
                break
            best, start, end = err, new_start, new_end
        logger.debug("histogram clip search: %d evaluations, bins [%d, %d]", evals, start, end)
        width = self.width
        return max(lo, (self.first + start) * width), min(hi, (self.first + end + 1) * width)

    def all_reduce(self) -> None:
        """Fold in the histograms of the other calibration ranks (`slimc.distributed`): each
        rank moves its histogram to the grid of all ranks' range (bins merge exactly), then the
        bins are summed, so the result equals one process that saw every batch. A no-op in one
        process."""
        if not distributed.active():
            return
        inf = torch.tensor(float("inf"), dtype=torch.float64)
        lo_here = self.min_val.double() if self.min_val is not None else inf
        hi_here = self.max_val.double() if self.max_val is not None else -inf
        lo = float(distributed.reduce_min(lo_here, "histogram minima"))
        hi = float(distributed.reduce_max(hi_here, "histogram maxima"))
        if lo > hi:  # no rank saw data
            return
        if self.min_val is None:
            self.exponent = self._grid_exponent(lo, hi)
        self._regrid(lo, hi)
        self.histogram = distributed.reduce_sum(self.histogram, "histograms")

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        """(scale float32, zero_point int32) as 0-d tensors from the searched clip range."""
        clip_min, clip_max = self.clip_range()
        return calculate_qparams(torch.tensor(clip_min), torch.tensor(clip_max), self.spec)
