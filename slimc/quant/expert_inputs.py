"""MoE expert stacks in the linear quantizers: per-expert input collectors (each expert accumulates
only the rows routed to it) and the rounding of a stack expert by expert."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx

from slimc import distributed
from slimc.linear_select import product_path
from slimc.program import Program
from slimc.quant.qparams import QuantizedWeight, quantize_weight
from slimc.quant.scheme import TensorQuantSpec

if TYPE_CHECKING:
    from slimc.quant.linear_engine import LinearQuantEngine
    from slimc.quant.weight_method import WeightMethod

log = logging.getLogger(__name__)


class ExpertInputs:
    """The input collectors of one expert stack, one per expert that received rows.

    Attributes:
        rows: per expert, how many calibration rows (token, chosen expert pairs) it received.
    """

    def __init__(self, experts: int, make: Callable[[], Any]) -> None:
        self.rows = [0] * experts
        self._make = make
        self._collectors: dict[int, Any] = {}

    def update(self, x: Tensor, expert_ids: Tensor) -> None:
        """Give each expert's collector the rows of `x` [S, K] routed to it (`expert_ids` [S])."""
        ids = expert_ids.reshape(-1)
        for expert in torch.unique(ids).tolist():
            rows = x[ids == expert]
            if expert not in self._collectors:
                self._collectors[expert] = self._make()
            self._collectors[expert].update(rows)
            self.rows[expert] += int(rows.shape[0])

    def of(self, expert: int) -> Any:
        """The collector of `expert`, or None when no row was routed to it."""
        return self._collectors.get(expert)

    def all_reduce(self) -> None:
        """Fold in the other calibration ranks' rows (`slimc.distributed`): the row counts are
        summed, and every expert some rank saw gets a collector holding the rows of all ranks
        (one collective per such expert, in expert order). A no-op in one process."""
        if not distributed.active():
            return
        counts = torch.tensor(self.rows, dtype=torch.int64)
        self.rows = distributed.reduce_sum(counts, "tokens per expert").tolist()
        for expert, rows in enumerate(self.rows):
            if rows == 0:
                continue
            if expert not in self._collectors:  # routed rows elsewhere only
                self._collectors[expert] = self._make()
            self._collectors[expert].all_reduce()

    def summary(self) -> str:
        """`tokens per expert: min 0, median 12, max 40` over the stack's experts."""
        counts = sorted(self.rows)
        return (
            f"tokens per expert: min {counts[0]}, median {counts[len(counts) // 2]}, "
            f"max {counts[-1]}"
        )


def round_expert_stack(
    quant: LinearQuantEngine,
    program: Program,
    node: fx.Node,
    weight: Tensor,
    spec: TensorQuantSpec,
    collected: Any,
    method: WeightMethod,
) -> QuantizedWeight:
    """Round an expert stack [E, N, K] with `method`, as `E` linears of their own.

    A method that reads no inputs rounds it in one call as `E * N` rows (each expert's rows are
    channels with their own ranges). A method that reads inputs (GPTQ, weighted SSZ) rounds
    each expert against its own collector (`collected`, an `ExpertInputs`); an expert routed
    fewer than `method.min_expert_tokens` calibration tokens is rounded to nearest instead.
    """
    experts, rows = weight.shape[0], weight.shape[1]
    if not isinstance(collected, ExpertInputs):
        flat = method.quantize_linear_weight(
            quant, program, node, weight.flatten(0, 1), spec, collected
        )
        return _stacked([flat], experts, rows)
    parts = []
    fallbacks = 0
    for expert in range(experts):
        inputs = collected.of(expert)
        if inputs is None or collected.rows[expert] < method.min_expert_tokens:
            parts.append(quantize_weight(weight[expert], spec))
            fallbacks += 1
        else:
            parts.append(
                method.quantize_linear_weight(quant, program, node, weight[expert], spec, inputs)
            )
    path = product_path(node)
    log.info(
        "%s: %s: %s; %d of %d experts rounded to nearest (fewer than %d tokens)",
        quant.name,
        path,
        collected.summary(),
        fallbacks,
        experts,
        method.min_expert_tokens,
    )
    if fallbacks:
        quant.stat(program, "experts rounded to nearest (too few tokens)", fallbacks)
    return _stacked(parts, experts, rows)


def _stacked(parts: list[QuantizedWeight], experts: int, rows: int) -> QuantizedWeight:
    """One `QuantizedWeight` [E, N, ...] from per-expert parts (or one [E * N, ...] part)."""

    def stack(tensors: list[Tensor]) -> Tensor:
        flat = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        return flat.reshape(experts, rows, *flat.shape[1:])

    zero_points = [p.zero_point for p in parts]
    zero_point = None if zero_points[0] is None else stack(zero_points)  # type: ignore[arg-type]
    return QuantizedWeight(
        stack([p.qdata for p in parts]), stack([p.scale for p in parts]), zero_point, parts[0].spec
    )
