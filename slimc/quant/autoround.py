"""AutoRound's core: learned rounding offsets and range factors, trained block-wise with SignSGD."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from slimc.quant.qparams import FP32_EPS, QuantizedWeight
from slimc.quant.scheme import TensorQuantSpec

V_BOUND = 0.5
"""Rounding offsets are clamped to [-V_BOUND, V_BOUND] (a weight moves at most one code)."""

RANGE_MIN = 0.5
"""Range factors alpha (max side) and beta (min side) are clamped to [RANGE_MIN, 1]."""

__all__ = [
    "RANGE_MIN",
    "V_BOUND",
    "RoundingParams",
    "TuneConfig",
    "TuneResult",
    "WeightQuantizer",
    "fake_quantize",
    "quantize_rounded",
    "tune_block",
]


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward pass (exactly), identity in the backward pass (straight-through)."""
    return torch.round(x) + (x - x.detach())


def _groups(w: Tensor, spec: TensorQuantSpec) -> int:
    """Elements per block along K (K itself per channel)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    k = w.shape[1]
    if spec.granularity == "channel":
        return k
    if spec.granularity == "group":
        if k % spec.group_size:
            raise ValueError(f"group_size={spec.group_size} does not divide K={k}")
        return spec.group_size
    raise ValueError(f"weights are quantized per channel or per group, not {spec.granularity!r}")


@dataclass
class RoundingParams:
    """What AutoRound learns for one weight [N, K] split into G blocks of `gs` elements.

    Attributes:
        v: rounding offset added before rounding, [N, G, gs], in [-V_BOUND, V_BOUND].
        alpha: factor on the block's max, [N, G] in [RANGE_MIN, 1] (None: no range tuning).
        beta: factor on the block's min, [N, G] in [RANGE_MIN, 1] (None: no range tuning).
    """

    v: Tensor
    alpha: Tensor | None = None
    beta: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.v, self.alpha, self.beta) if t is not None]

    def requires_grad_(self) -> RoundingParams:
        for t in self.tensors():
            t.requires_grad_(True)
        return self

    def clamp_(self) -> None:
        """Project onto the allowed box (in place, no autograd)."""
        with torch.no_grad():
            self.v.clamp_(-V_BOUND, V_BOUND)
            for t in (self.alpha, self.beta):
                if t is not None:
                    t.clamp_(RANGE_MIN, 1.0)

    def detached(self, device: torch.device | str | None = None) -> RoundingParams:
        """A copy without autograd (optionally moved to `device`)."""

        def cp(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(device).clone()

        v = cp(self.v)
        assert v is not None
        return RoundingParams(v, cp(self.alpha), cp(self.beta))


class WeightQuantizer:
    """One weight's blocks and MinMax range; fake-quantizes or quantizes it under learned params.

    Raises:
        ValueError: (at construction) the weight is not 2-D, or the group size does not
            divide K.
    """

    def __init__(self, w: Tensor, spec: TensorQuantSpec) -> None:
        gs = _groups(w, spec)
        n, k = w.shape
        self.spec = spec
        self.shape = w.shape
        self.dtype = w.dtype
        self.blocks = w.detach().to(torch.float32).reshape(n, k // gs, gs)
        lo, hi = torch.aminmax(self.blocks, dim=-1)
        self.lo, self.hi = lo.clamp(max=0.0), hi.clamp(min=0.0)

    def init_params(self, minmax: bool) -> RoundingParams:
        """Zero offsets and unit range factors: plain MinMax rounding."""
        v = torch.zeros_like(self.blocks)
        if not minmax:
            return RoundingParams(v)
        return RoundingParams(v, torch.ones_like(self.lo), torch.ones_like(self.hi))

    def _qparams(self, p: RoundingParams) -> tuple[Tensor, Tensor | None]:
        """Scale and float zero point [N, G, 1] (None if symmetric) of the tuned range.

        `qparams_from_minmax`'s formulas on `[min * beta, max * alpha]`, differentiable in
        alpha and beta (the zero point's rounding is straight-through).
        """
        spec, lo, hi = self.spec, self.lo, self.hi
        if p.alpha is not None and p.beta is not None:
            lo, hi = lo * p.beta, hi * p.alpha
        if spec.symmetric:
            scale = torch.clamp(torch.maximum(-lo, hi) / float(spec.qmax), min=FP32_EPS)
            return scale.unsqueeze(-1), None
        scale = torch.clamp((hi - lo) / float(spec.qmax - spec.qmin), min=FP32_EPS)
        zp = torch.clamp(float(spec.qmin) - round_ste(lo / scale), spec.qmin, spec.qmax)
        return scale.unsqueeze(-1), zp.unsqueeze(-1)

    def _codes(self, p: RoundingParams, ste: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        scale, zp = self._qparams(p)
        x = self.blocks / scale + p.v
        if zp is not None:
            x = x + zp
        q = torch.clamp(round_ste(x) if ste else torch.round(x), self.spec.qmin, self.spec.qmax)
        return q, scale, zp

    def fake_quantize(self, p: RoundingParams) -> Tensor:
        """`s * (clamp(round(W / s + zp + V), qmin, qmax) - zp)`, differentiable in the params.

        Rounding is straight-through; the clamp passes no gradient outside [qmin, qmax].
        """
        q, scale, zp = self._codes(p, ste=True)
        if zp is not None:
            q = q - zp
        return (q * scale).reshape(self.shape).to(self.dtype)

    def quantize(self, p: RoundingParams) -> QuantizedWeight:
        """The integer codes, scales and zero points that `fake_quantize` dequantizes from."""
        with torch.no_grad():
            q, scale, zp = self._codes(p, ste=False)
        return QuantizedWeight(
            qdata=q.to(torch.int8).reshape(self.shape).cpu(),
            scale=scale.squeeze(-1).cpu(),
            zero_point=None if zp is None else zp.squeeze(-1).to(torch.int8).cpu(),
            spec=self.spec,
        )


def fake_quantize(w: Tensor, spec: TensorQuantSpec, p: RoundingParams) -> Tensor:
    """`WeightQuantizer(w, spec).fake_quantize(p)`."""
    return WeightQuantizer(w, spec).fake_quantize(p)


def quantize_rounded(w: Tensor, spec: TensorQuantSpec, p: RoundingParams) -> QuantizedWeight:
    """`WeightQuantizer(w, spec).quantize(p)`: the codes of the learned rounding.

    Raises:
        ValueError: w is not 2-D or the group size does not divide K.
    """
    return WeightQuantizer(w, spec).quantize(p)


@dataclass(frozen=True)
class TuneConfig:
    """SignSGD settings for one block.

    Attributes:
        iters: optimizer steps.
        lr: initial step size, decayed linearly to 0 over `iters`.
        minmax: also learn the range factors alpha / beta.
        batch_size: samples whose gradients are summed per step.
        seed: seed of the sample order.
    """

    iters: int
    lr: float
    minmax: bool = True
    batch_size: int = 1
    seed: int = 0


@dataclass
class TuneResult:
    """A block's learned parameters and its loss on the evaluation batch (the first samples).

    Attributes:
        params: learned parameters per weight name (on the CPU).
        rtn_loss: loss with plain MinMax rounding.
        loss: loss with `params` (never above `rtn_loss`: RTN is kept if tuning lost).
        kept_rtn: tuning did not beat plain rounding on the evaluation batch.
    """

    params: dict[str, RoundingParams]
    rtn_loss: float
    loss: float
    kept_rtn: bool


LossFn = Callable[[int, Mapping[str, Tensor]], Tensor]
"""`loss_fn(sample, weights)`: the block's loss on one sample with these (fake-quantized) weights."""


def tune_block(
    weights: Mapping[str, tuple[Tensor, TensorQuantSpec]],
    n_samples: int,
    loss_fn: LossFn,
    config: TuneConfig,
) -> TuneResult:
    """Learn rounding offsets (and range factors) for a block's weights with SignSGD.

    Each step draws `batch_size` samples (a fresh shuffle per pass over the data), sums
    `loss_fn` over them with every weight fake-quantized by `fake_quantize`, and moves each
    parameter by `-lr_t * sign(grad)` (`lr_t` decays linearly from `lr` to 0), then clamps
    it. The parameters with the lowest step loss are kept (AutoRound's choice), and finally
    compared with plain rounding on the first `batch_size` samples.

    Args:
        weights: name -> (float weight [N, K], its spec); the weights are not modified.
        n_samples: number of samples `loss_fn` accepts (indices 0..n-1).
        loss_fn: differentiable loss of one sample.
        config: optimizer settings.

    Returns:
        The learned parameters, on the CPU.
    """
    if n_samples < 1:
        raise ValueError("tune_block needs at least one sample")
    with torch.inference_mode(False), torch.enable_grad():
        quantizers = {name: WeightQuantizer(w, spec) for name, (w, spec) in weights.items()}
        params = {n: q.init_params(config.minmax).requires_grad_() for n, q in quantizers.items()}
        batch = max(1, min(config.batch_size, n_samples))
        eval_idx = list(range(batch))

        def quantized(ps: Mapping[str, RoundingParams]) -> dict[str, Tensor]:
            return {n: q.fake_quantize(ps[n]) for n, q in quantizers.items()}

        def evaluate(ps: Mapping[str, RoundingParams]) -> float:
            with torch.no_grad():
                ws = quantized(ps)
                return sum(float(loss_fn(i, ws)) for i in eval_idx) / len(eval_idx)

        rtn_loss = evaluate(params)
        best_loss, best = float("inf"), {n: p.detached() for n, p in params.items()}
        gen = torch.Generator().manual_seed(config.seed)
        order: list[int] = []
        for it in range(config.iters):
            if len(order) < batch:
                order += torch.randperm(n_samples, generator=gen).tolist()
            idx, order = order[:batch], order[batch:]
            # quantize once per step; each sample's backward stops at the quantized weights
            w_hat = quantized(params)
            leaves = {n: w.detach().requires_grad_() for n, w in w_hat.items()}
            total = 0.0
            for i in idx:
                loss = loss_fn(i, leaves) / len(idx)
                loss.backward()
                total += float(loss.detach())
            if total < best_loss:
                best_loss, best = total, {n: p.detached() for n, p in params.items()}
            reached = [n for n, leaf in leaves.items() if leaf.grad is not None]
            if reached:
                torch.autograd.backward(
                    [w_hat[n] for n in reached],
                    [leaves[n].grad for n in reached],  # type: ignore[misc]
                )
            lr_t = config.lr * (1.0 - it / config.iters)
            with torch.no_grad():
                for p in params.values():
                    for t in p.tensors():
                        if t.grad is not None:
                            t.sub_(lr_t * torch.sign(t.grad))
                            t.grad = None
                    p.clamp_()
        loss = evaluate(best) if config.iters else rtn_loss
        kept_rtn = not loss < rtn_loss
        if kept_rtn:
            loss = rtn_loss
            best = {n: q.init_params(config.minmax) for n, q in quantizers.items()}
    return TuneResult({n: p.detached("cpu") for n, p in best.items()}, rtn_loss, loss, kept_rtn)
