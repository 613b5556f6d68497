"""gptq: linear-quant whose weights are rounded by GPTQ against each input's Hessian."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from slimc.errors import UserError
from slimc.pass_base import OptionError, option
from slimc.program import Program, node_loc
from slimc.quant.gptq import gptq_quantize, hessian_error, hessian_factor
from slimc.quant.hessian import HessianAccumulator
from slimc.quant.linear_engine import SCHEME_HELP, LinearQuantEngine
from slimc.quant.qparams import QuantizedWeight, quantize_weight
from slimc.quant.scheme import LinearQuantScheme, SchemeName, TensorQuantSpec
from slimc.quant.weight_method import WeightMethod

log = logging.getLogger(__name__)
slimc_ops = torch.ops.slimc


def per_token_fake_quant(spec: TensorQuantSpec) -> Any:
    """The run-time dynamic activation quantization, as a function on rows [T, K]."""

    def fake_quant(rows: torch.Tensor) -> torch.Tensor:
        q, scale = slimc_ops.quantize_per_token(rows, spec.qmin, spec.qmax)
        return q.to(torch.float32) * scale.to(torch.float32)

    return fake_quant


@dataclass(frozen=True)
class GPTQRounding(WeightMethod):
    """GPTQ's weight method: each weight rounded column by column against its input Hessian."""

    block_size: int
    percdamp: float
    act_order: bool
    range_steps: int
    min_expert_tokens: int
    reads_inputs: ClassVar[bool] = True

    def input_collector(self, scheme: LinearQuantScheme, k: int) -> HessianAccumulator:
        act = scheme.activation
        transform = per_token_fake_quant(act) if act is not None and act.dynamic else None
        return HessianAccumulator(k, transform)

    def quantize_linear_weight(
        self,
        quant: LinearQuantEngine,
        program: Program,
        node: fx.Node,
        weight: torch.Tensor,
        spec: TensorQuantSpec,
        collected: Any,
    ) -> QuantizedWeight:
        assert isinstance(collected, HessianAccumulator)
        path = node_loc(node) or node.name
        if collected.rows == 0:
            raise UserError(f"gptq: {path} saw no calibration input")
        try:
            factor = collected.derived(
                f"gptq:{self.percdamp}:{self.act_order}",
                lambda h: hessian_factor(h, self.percdamp, self.act_order),
            )
            result = gptq_quantize(
                weight,
                factor,
                spec,
                block_size=self.block_size,
                percdamp=self.percdamp,
                act_order=self.act_order,
                range_steps=self.range_steps,
            )
        except ValueError as exc:
            raise UserError(f"gptq: {path}: {exc}") from None
        _report(quant, program, path, weight, collected.hessian, spec, result.weight)
        if result.damp != self.percdamp:
            quant.stat(program, "Hessians needing more dampening")
        if result.dead_columns:
            quant.stat(program, "dead input channels zeroed", result.dead_columns)
        return result.weight


def _report(
    quant: LinearQuantEngine,
    program: Program,
    path: str,
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: TensorQuantSpec,
    qw: QuantizedWeight,
) -> None:
    """Log and count the Hessian-weighted error against plain MinMax rounding."""
    w = weight.to(torch.float32)
    rtn = hessian_error(w, quantize_weight(w, spec).dequantize(), hessian)
    ours = hessian_error(w, qw.dequantize(), hessian)
    gain = 100.0 * (rtn - ours) / rtn if rtn > 0 else 0.0
    log.info("gptq: %s: output error %.4g (RTN %.4g, %.1f%% lower)", path, ours, rtn, gain)
    quant.stat(program, "output error (sum over linears)", ours)
    quant.stat(program, "output error of RTN (sum over linears)", rtn)


@dataclass(frozen=True, kw_only=True)
class GPTQ(LinearQuantEngine):
    """Quantize linears like linear-quant, rounding weights with GPTQ (layer-wise Hessians).

    Each chosen linear's input Hessian `H = 2/n sum x x^T` is accumulated on calibration data
    layer by layer (each layer sees the already-quantized outputs of the layers before it;
    linears reading one value share one Hessian; dynamic per-token activations are
    fake-quantized first, as the linear will see them). The weight is then quantized column by
    column in blocks of `block-size`, each column's rounding error compensated on the columns
    not yet quantized (`percdamp` x mean(diag H) added to the diagonal, multiplied by 10 and
    retried when the Hessian is not positive definite; the factorization runs in float64, in
    float32 from K = 16384, once per input its linears share). Each group's range is the
    MinMax range shrunk by the ratio (of `range-steps` between 1 and 0.75) with the lowest
    |w - Q(w)|^2.4 error. MoE experts each get the Hessian of the tokens routed to them (one
    K x K matrix per expert of a layer's stack, while it is quantized); an expert routed fewer
    than `expert-min-tokens` is rounded to nearest. Scheme, group size, symmetry and activation
    handling are linear-quant's. Lossy.
    """

    name = "gptq"
    cli_role = "weight-method"

    scheme: SchemeName = option("w4a16", SCHEME_HELP)
    block_size: int = option(128, "Columns quantized together before the lazy error update.")
    percdamp: float = option(0.01, "Dampening added to diag(H), relative to its mean.")
    act_order: bool = option(
        True, "Quantize columns by decreasing Hessian diagonal (groups stay contiguous in K)."
    )

    range_steps: int = option(
        20,
        "Shrink ratios (1 down to 0.75) tried per weight group, keeping the lowest |w - Q(w)|^2.4 "
        "error per row; 0 or 1 = MinMax ranges.",
    )
    expert_min_tokens: int = option(
        32,
        "MoE experts routed fewer calibration tokens than this are rounded to nearest "
        "(each other expert gets GPTQ on its own Hessian).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise OptionError(f"pass 'gptq': block-size must be >= 1, got {self.block_size}")
        if self.expert_min_tokens < 0:
            raise OptionError(
                f"pass 'gptq': expert-min-tokens must be >= 0, got {self.expert_min_tokens}"
            )
        if not 0 <= self.percdamp < 1:
            raise OptionError(f"pass 'gptq': percdamp must be in [0, 1), got {self.percdamp}")

    def weight_method(self) -> GPTQRounding:
        """GPTQ rounding with this pass's block size, dampening, order and range search."""
        return GPTQRounding(
            self.block_size,
            self.percdamp,
            self.act_order,
            self.range_steps,
            self.expert_min_tokens,
        )
