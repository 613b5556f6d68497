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


def _sq_error(blocks: Tensor, codes: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
    return ((codes - zp) * scale - blocks).pow(2).sum(-1, keepdim=True)


def _refit(blocks: Tensor, codes: Tensor, spec: TensorQuantSpec) -> tuple[Tensor, Tensor]:
    """Least-squares scale (and zero point) for fixed codes: `w ~ scale * (q - zp)`.

    Symmetric: `scale = sum(w q) / sum(q^2)`. Asymmetric: the line `w ~ a q + b` fitted by least
    squares gives `scale = a` and `zp = round(-b / a)`, clamped to the integer range. Rows whose
    fit is degenerate get a non-positive scale and are rejected by the caller.
    """
    if spec.symmetric:
        num = (blocks * codes).sum(-1, keepdim=True)
        den = codes.pow(2).sum(-1, keepdim=True).clamp(min=1e-30)
        return num / den, torch.zeros_like(num)
    q_mean = codes.mean(-1, keepdim=True)
    w_mean = blocks.mean(-1, keepdim=True)
    centred = codes - q_mean
    den = centred.pow(2).sum(-1, keepdim=True).clamp(min=1e-30)
    a = (centred * (blocks - w_mean)).sum(-1, keepdim=True) / den
    b = w_mean - a * q_mean
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    zp = torch.clamp(torch.round(-b / safe_a), spec.qmin, spec.qmax)
    return a, zp


def ssz_quantize_weight(
    w: Tensor, spec: TensorQuantSpec, iters: int = SSZ_ITERS
) -> QuantizedWeight:
    """Quantize a weight [N, K] per channel or per group, refitting the ranges to the codes.

    Starts from MinMax; each round fits the least-squares scale (and, asymmetric, zero point)
    to the current integer codes, re-rounds, and keeps the new parameters only for the blocks
    (channels or groups) whose squared error went down, so no block ends worse than MinMax.
    Stops after `iters` rounds or when no block improves by more than `TOLERANCE`.

    Raises:
        ValueError: as `quantize_weight` (shape, granularity, NaN/inf, group size).
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
    lo, hi = torch.aminmax(blocks, dim=-1)
    scale32, zp32 = calculate_qparams(lo, hi, spec)
    scale = scale32.to(torch.float64).unsqueeze(-1)
    zp = zp32.to(torch.float64).unsqueeze(-1)
    codes = _codes(blocks, scale, zp, spec)
    error = _sq_error(blocks, codes, scale, zp)
    for _ in range(iters):
        new_scale, new_zp = _refit(blocks, codes, spec)
        valid = new_scale > 0
        new_scale = torch.where(valid, new_scale, scale).to(torch.float32).to(torch.float64)
        new_zp = torch.where(valid, new_zp, zp)
        new_codes = _codes(blocks, new_scale, new_zp, spec)
        new_error = _sq_error(blocks, new_codes, new_scale, new_zp)
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
