"""ssz: linear-quant whose weight ranges are refitted to their integer codes (data-free)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from slimc.passes.linear_quant import SCHEME_HELP, LinearQuant, SchemeName
from torch import fx

from slimc.errors import UserError
from slimc.pass_base import OptionError, option
from slimc.program import Program, node_loc
from slimc.quant.qparams import QuantizedWeight, quantize_weight
from slimc.quant.scheme import TensorQuantSpec
from slimc.quant.ssz import SSZ_ITERS, ssz_quantize_weight

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SSZ(LinearQuant):
    """Quantize linears like linear-quant, with SSZ weight ranges (least-squares refit).

    Each weight block (output channel, or group along K) starts from its MinMax range; each
    round fits the least-squares scale (and, asymmetric, integer zero point) to the current
    integer codes and re-rounds, keeping a block's new range only when its squared error went
    down. Needs no data for the weights; activations follow the scheme as in linear-quant. Lossy.
    """

    name = "ssz"

    scheme: SchemeName = option("w4a16", SCHEME_HELP)
    iters: int = option(SSZ_ITERS, "Maximum refit rounds per weight.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters < 0:
            raise OptionError(f"pass 'ssz': iters must be >= 0, got {self.iters}")

    def quantize_linear_weight(
        self,
        program: Program,
        node: fx.Node,
        weight: torch.Tensor,
        spec: TensorQuantSpec,
        collected: Any,
    ) -> QuantizedWeight:
        path = node_loc(node) or node.name
        try:
            qw = ssz_quantize_weight(weight, spec, self.iters)
        except ValueError as exc:
            raise UserError(f"ssz: {path}: {exc}") from None
        w = weight.detach().to(torch.float32)
        ours = float((qw.dequantize() - w).pow(2).sum())
        rtn = float((quantize_weight(w, spec).dequantize() - w).pow(2).sum())
        log.debug("ssz: %s: weight squared error %.4g (MinMax %.4g)", path, ours, rtn)
        self.stat(program, "weight squared error (sum over linears)", ours)
        self.stat(program, "weight squared error of MinMax (sum over linears)", rtn)
        return qw
