"""ssz: linear-quant whose weight ranges are refitted to their integer codes (data-free)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from slimc.errors import UserError
from slimc.pass_base import OptionError, option
from slimc.program import Program, node_loc
from slimc.quant.hessian import HessianAccumulator
from slimc.quant.linear_engine import SCHEME_HELP, LinearQuantEngine
from slimc.quant.qparams import QuantizedWeight, quantize_weight
from slimc.quant.scheme import LinearQuantScheme, SchemeName, TensorQuantSpec
from slimc.quant.ssz import SSZ_ITERS, ssz_quantize_weight
from slimc.quant.weight_method import WeightMethod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSZRefit(WeightMethod):
    """SSZ's weight method: MinMax ranges refitted by least squares to the integer codes."""

    iters: int
    weighted: bool
    """Weigh each input channel's error by E[x^2] of the calibration inputs."""

    @property
    def reads_inputs(self) -> bool:  # type: ignore[override]
        return self.weighted

    def input_collector(self, scheme: LinearQuantScheme, k: int) -> HessianAccumulator:
        return HessianAccumulator(k)

    def quantize_linear_weight(
        self,
        quant: LinearQuantEngine,
        program: Program,
        node: fx.Node,
        weight: torch.Tensor,
        spec: TensorQuantSpec,
        collected: Any,
    ) -> QuantizedWeight:
        path = node_loc(node) or node.name
        importance = None
        if isinstance(collected, HessianAccumulator):
            if collected.rows == 0:
                raise UserError(f"ssz: {path} saw no calibration input")
            importance = torch.diagonal(collected.hessian)
        try:
            qw = ssz_quantize_weight(weight, spec, self.iters, importance)
        except ValueError as exc:
            raise UserError(f"ssz: {path}: {exc}") from None
        w = weight.detach().to(torch.float32)
        h = torch.ones(w.shape[1]) if importance is None else importance.float()
        ours = float(((qw.dequantize() - w).pow(2) * h).sum())
        rtn = float(((quantize_weight(w, spec).dequantize() - w).pow(2) * h).sum())
        what = "weight squared error" if importance is None else "E[x^2]-weighted weight error"
        log.debug("ssz: %s: %s %.4g (MinMax %.4g)", path, what, ours, rtn)
        quant.stat(program, f"{what} (sum over linears)", ours)
        quant.stat(program, f"{what} of MinMax (sum over linears)", rtn)
        return qw


@dataclass(frozen=True, kw_only=True)
class SSZ(LinearQuantEngine):
    """Quantize linears like linear-quant, with SSZ weight ranges (least-squares refit).

    Each weight block (output channel, or group along K) starts from its MinMax range; each
    round fits the least-squares scale (and, asymmetric, integer zero point) to the current
    integer codes and re-rounds, keeping a block's new range only when its squared error went
    down. With `weighting=activation` each input channel's error counts E[x_k^2] times (from
    the calibration inputs, layer by layer), so the fit follows the linear's output error;
    `weighting=none` is msModelSlim's data-free rule. Activations follow the scheme as in
    linear-quant. Lossy.
    """

    name = "ssz"
    cli_role = "weight-method"

    scheme: SchemeName = option("w4a16", SCHEME_HELP)
    iters: int = option(SSZ_ITERS, "Maximum refit rounds per weight.")
    weighting: Literal["activation", "none"] = option(
        "activation",
        "activation: weigh each input channel's error by E[x^2] of the calibration inputs; "
        "none: plain squared weight error (data-free, msModelSlim's rule).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters < 0:
            raise OptionError(f"pass 'ssz': iters must be >= 0, got {self.iters}")

    def weight_method(self) -> SSZRefit:
        """The SSZ refit with this pass's rounds and weighting."""
        return SSZRefit(self.iters, weighted=self.weighting == "activation")
