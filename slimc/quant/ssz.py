"""SSZ: a data-free weight quantizer that refits scale (and zero point) to its own integer codes."""

from __future__ import annotations

import torch
from torch import Tensor

from slimc.quant.qparams import QuantizedWeight, calculate_qparams
from slimc.quant.scheme import TensorQuantSpec

SSZ_ITERS = 50
"""Default number of refit rounds (msModelSlim's code default; its expert table uses 10)."""

TOLERANCE = 1e-10
"""Stop when no block's squared error improves by more than this (relative or absolute)."""


def _codes(blocks: Tensor, scale: Tensor, zp: Tensor, spec: TensorQuantSpec) -> Tensor:
    return torch.clamp(torch.round(blocks / scale) + zp, spec.qmin, spec.qmax)


def _sq_error(blocks: Tensor, codes: Tensor, scale: Tensor, zp: Tensor, h: Tensor) -> Tensor:
    return (h * ((codes - zp) * scale - blocks).pow(2)).sum(-1, keepdim=True)


def _refit(
    blocks: Tensor, codes: Tensor, spec: TensorQuantSpec, h: Tensor
) -> tuple[Tensor, Tensor]:
    """Weighted least-squares scale (and zero point) for fixed codes: `w ~ scale * (q - zp)`.

    Each element counts with its weight `h` (all ones: plain least squares). Symmetric:
    `scale = sum(h w q) / sum(h q^2)`. Asymmetric: the line `w ~ a q + b` fitted by weighted
    least squares gives `scale = a` and `zp = round(-b / a)`, clamped to the integer range.
    Rows whose fit is degenerate get a non-positive scale and are rejected by the caller.
    """
    if spec.symmetric:
        num = (h * blocks * codes).sum(-1, keepdim=True)
        den = (h * codes.pow(2)).sum(-1, keepdim=True).clamp(min=1e-30)
        return num / den, torch.zeros_like(num)
    h_sum = h.sum(-1, keepdim=True).clamp(min=1e-30)
    q_mean = (h * codes).sum(-1, keepdim=True) / h_sum
    w_mean = (h * blocks).sum(-1, keepdim=True) / h_sum
    centred = codes - q_mean
    den = (h * centred.pow(2)).sum(-1, keepdim=True).clamp(min=1e-30)
    a = (h * centred * (blocks - w_mean)).sum(-1, keepdim=True) / den
    b = w_mean - a * q_mean
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    zp = torch.clamp(torch.round(-b / safe_a), spec.qmin, spec.qmax)
    return a, zp


def _importance_blocks(importance: Tensor | None, n: int, k: int, group: int) -> Tensor:
    """Per-element weights laid out like the blocks [N * K / group, group] (ones if None)."""
    if importance is None:
        return torch.ones(1, group, dtype=torch.float64)
    h = importance.detach().to(torch.float64).reshape(-1)
    if h.numel() != k or not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError(f"importance must be {k} finite non-negative values")
    h = h / h.mean().clamp(min=1e-30)
    # a channel that never fires still keeps a little weight, so its codes stay sensible
    h = h.clamp(min=1e-6)
    return h.reshape(1, k // group, group).expand(n, -1, -1).reshape(n * (k // group), group)


def ssz_quantize_weight(
    w: Tensor,
    spec: TensorQuantSpec,
    iters: int = SSZ_ITERS,
    importance: Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a weight [N, K] per channel or per group, refitting the ranges to the codes.

    Starts from MinMax; each round fits the least-squares scale (and, asymmetric, zero point)
    to the current integer codes, re-rounds, and keeps the new parameters only for the blocks
    (channels or groups) whose squared error went down, so no block ends worse than MinMax.
    Stops after `iters` rounds or when no block improves by more than `TOLERANCE`.

    With `importance` [K] (e.g. E[x_k^2] of the linear's input), input channel k's error
    counts `importance[k]` times: the fit then minimizes the output error of the linear for
    inputs with independent channels rather than the weight's own squared error.

    Raises:
        ValueError: as `quantize_weight` (shape, granularity, NaN/inf, group size), or an
            `importance` that is not [K], finite and non-negative.
    """
    if w.dim() != 2:
        raise ValueError(f"ssz expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    if spec.granularity not in ("channel", "group"):
        raise ValueError(
            f"weights are quantized per channel or per group, not {spec.granularity!r}"
        )
    group = spec.group_size if spec.granularity == "group" else k
    if k % group:
        raise ValueError(f"group_size={group} does not divide the weight's input dim K={k}")
    wf = w.detach().to(torch.float64)
    if not bool(torch.isfinite(wf).all()):
        raise ValueError("weight contains NaN or inf; cannot quantize")
    blocks = wf.reshape(n * (k // group), group)
    h = _importance_blocks(importance, n, k, group)
    lo, hi = torch.aminmax(blocks, dim=-1)
    scale32, zp32 = calculate_qparams(lo, hi, spec)
    scale = scale32.to(torch.float64).unsqueeze(-1)
    zp = zp32.to(torch.float64).unsqueeze(-1)
    codes = _codes(blocks, scale, zp, spec)
    error = _sq_error(blocks, codes, scale, zp, h)
    for _ in range(iters):
        new_scale, new_zp = _refit(blocks, codes, spec, h)
        valid = new_scale > 0
        new_scale = torch.where(valid, new_scale, scale).to(torch.float32).to(torch.float64)
        new_zp = torch.where(valid, new_zp, zp)
        new_codes = _codes(blocks, new_scale, new_zp, spec)
        new_error = _sq_error(blocks, new_codes, new_scale, new_zp, h)
        gain = error - new_error
        better = valid & (gain > 0)
        if not bool(better.any()):
            break
        scale = torch.where(better, new_scale, scale)
        zp = torch.where(better, new_zp, zp)
        codes = torch.where(better, new_codes, codes)
        error = torch.where(better, new_error, error)
        if bool((gain[better] <= TOLERANCE * torch.clamp(error[better], min=1.0)).all()):
            break
    groups = k // group
    return QuantizedWeight(
        qdata=codes.to(torch.int8).reshape(n, k),
        scale=scale.to(torch.float32).reshape(n, groups),
        zero_point=None if spec.symmetric else zp.to(torch.int8).reshape(n, groups),
        spec=spec,
    )
