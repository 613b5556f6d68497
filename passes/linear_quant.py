"""linear-quant: quantize chosen linears to a scheme (QDQ form) with MinMax / Histogram observers."""

from __future__ import annotations

from dataclasses import dataclass

from slimc.quant.linear_engine import LinearQuantEngine
from slimc.quant.weight_method import RoundToNearest, WeightMethod


@dataclass(frozen=True, kw_only=True)
class LinearQuant(LinearQuantEngine):
    """Quantize linears to a scheme: MinMax weights, MinMax/Histogram static activations.

    Weights are quantized per output channel (or per group along K) with the MinMax range of
    msModelSlim (section 2.6); static activations get a per-tensor range observed layer by layer
    on calibration data, each layer seeing the already-quantized outputs of the layers before it;
    dynamic activations are quantized per token at run time. The result is the QDQ form:
    `dequantize_affine(int weight) -> aten.linear` and, for activations,
    `quantize_affine -> dequantize_affine` on the linear's input. Lossy.
    """

    name = "linear-quant"
    cli_role = "weight-method"
    cli_choice = "rtn"

    def weight_method(self) -> WeightMethod:
        """Round to nearest with MinMax ranges."""
        return RoundToNearest()
