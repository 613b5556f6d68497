"""How the linear-quantization engine rounds a weight: the strategy base, round to nearest, replay."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import fx

from slimc.errors import UserError
from slimc.program import Program, node_loc
from slimc.quant.qparams import QuantizedWeight, quantize_weight
from slimc.quant.scheme import LinearQuantScheme, TensorQuantSpec

if TYPE_CHECKING:
    from slimc.quant.linear_engine import LinearQuantEngine


class WeightMethod:
    """How the engine rounds each chosen linear's weight; this base rounds to nearest (MinMax).

    Attributes:
        reads_inputs: whether the method needs each linear's calibration inputs (GPTQ's
            Hessian); the engine then runs the calibration data even for dynamic activations.
    """

    reads_inputs: bool = False
    experts: Literal["own", "float"] = "own"
    """What the method does with MoE expert stacks [E, N, K]: `own` rounds them (see
    `slimc.quant.expert_inputs.round_expert_stack`), `float` leaves them out (a method with its
    own calibration loop over linears)."""
    min_expert_tokens: int = 1
    calibrates_across_ranks: bool = True
    """Whether the method's collectors are reduced over distributed ranks (`all_reduce`); a
    method with its own calibration loop (AutoRound) says no."""
    """A method that reads inputs rounds an expert routed fewer calibration tokens to nearest."""

    def input_collector(self, scheme: LinearQuantScheme, k: int) -> Any:
        """An object whose `update(x)` sees every calibration input of a linear (or None).

        Linears reading the same value share one collector. Only called when `reads_inputs`.
        """
        return None

    def quantize_linear_weight(
        self,
        quant: LinearQuantEngine,
        program: Program,
        node: fx.Node,
        weight: torch.Tensor,
        spec: TensorQuantSpec,
        collected: Any,
    ) -> QuantizedWeight:
        """Quantize one linear's weight [N, K]; `collected` is its input collector (or None).

        `quant` is the pass running the method (for its name and statistics).
        """
        return quantize_weight(weight, spec)

    def calibrate_and_rewrite(
        self,
        quant: LinearQuantEngine,
        program: Program,
        targets: list[fx.Node],
        scheme: LinearQuantScheme,
    ) -> None:
        """Run the calibration data layer by layer and rewrite `targets` as each layer is seen.

        The engine's own loop (static ranges observed, inputs collected) unless a method needs
        another one (AutoRound trains each decoder layer); either ends in `quant.rewrite`.
        """
        quant.observe_and_rewrite(program, targets, scheme, self)


class RoundToNearest(WeightMethod):
    """Round to nearest with each block's MinMax range (msModelSlim section 2.6); data-free."""


class Replay(WeightMethod):
    """The rounded weight a stopped run recorded for a linear (`slimc quant --resume`)."""

    def __init__(self, parts: dict[str, torch.Tensor | None]) -> None:
        self.parts = parts

    def quantize_linear_weight(
        self,
        quant: LinearQuantEngine,
        program: Program,
        node: fx.Node,
        weight: torch.Tensor,
        spec: TensorQuantSpec,
        collected: Any,
    ) -> QuantizedWeight:
        qdata, scale, zero_point = (
            self.parts["qdata"],
            self.parts["scale"],
            self.parts["zero_point"],
        )
        assert qdata is not None and scale is not None
        if qdata.dim() == 3:  # an expert stack, recorded [E, N, ...]: rounded as [E * N, ...]
            qdata, scale = qdata.flatten(0, 1), scale.flatten(0, 1)
            zero_point = None if zero_point is None else zero_point.flatten(0, 1)
        if qdata.shape != weight.shape:
            raise UserError(
                f"--resume: the recorded weight of {node_loc(node)} is {tuple(qdata.shape)}, "
                f"the model's is {tuple(weight.shape)}: the work directory is of another run"
            )
        return QuantizedWeight(qdata, scale, zero_point, spec)
