"""Scale formulas shared by the smoothing passes."""

from __future__ import annotations

import torch


def smoothquant_scale(
    act: torch.Tensor, weight: torch.Tensor, alpha: float, beta: float, scale_min: float = 1e-5
) -> torch.Tensor:
    """`s_c = max(A_c^alpha / W_c^beta, scale_min)` with A, W per-channel absolute maxima.

    Weight maxima are clamped at 1e-5 first so an all-zero column cannot divide by zero.
    """
    a = act.double().clamp(min=0)
    w = weight.double().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(beta)).clamp(min=scale_min)
