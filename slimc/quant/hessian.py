"""Hessian accumulation `H = 2/n sum x x^T` over a linear's calibration inputs (GPTQ, ADMM)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from slimc import distributed


class HessianAccumulator:
    """Running average of `2 x x^T` over every row (token) of the inputs given to `update`.

    Attributes:
        hessian: float32 [K, K], the average so far (zeros before any update).
        rows: how many rows have been seen.
        transform: applied to each input before it is accumulated (for example the activation
            fake-quantization the linear will see at run time); identity when None.
    """

    def __init__(self, k: int, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.hessian = torch.zeros(k, k, dtype=torch.float32)
        self.rows = 0
        self.transform = transform
        self._derived: dict[str, Any] = {}

    def derived(self, key: str, make: Callable[[Tensor], Any]) -> Any:
        """`make(hessian)`, computed once per `key` until the next `update`: the linears that
        share this input (q, k and v) share what is derived from its Hessian (a factorization)."""
        if key not in self._derived:
            self._derived[key] = make(self.hessian)
        return self._derived[key]

    def update(self, x: Tensor) -> None:
        """Fold the rows of `x` [..., K] into the running average.

        Raises:
            ValueError: the last dimension is not K, or the input holds NaN or inf.
        """
        k = self.hessian.shape[0]
        if x.shape[-1] != k:
            raise ValueError(f"expected inputs with {k} features, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, k)
        if self.transform is not None:
            rows = self.transform(rows)
        rows = rows.to(torch.float32)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("input holds NaN or inf")
        n = rows.shape[0]
        if n == 0:
            return
        self._derived.clear()
        total = self.rows + n
        self.hessian.mul_(self.rows / total)
        self.hessian.addmm_(rows.t(), rows, alpha=2.0 / total)
        self.rows = total

    def all_reduce(self) -> None:
        """Make this the average over the rows of every calibration rank (`slimc.distributed`):
        each rank's average weighted by its rows. A no-op in one process."""
        if not distributed.active():
            return
        total = distributed.reduce_count(self.rows, "Hessian row counts")
        weighted = self.hessian.double() * self.rows
        summed = distributed.reduce_sum(weighted, "Hessians")
        self.hessian = (summed / max(total, 1)).to(torch.float32)
        self.rows = total
        self._derived.clear()
