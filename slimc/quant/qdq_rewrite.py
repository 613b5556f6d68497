"""The QDQ form of one quantized linear: its weight dequantized from integer codes, its input
quantized and dequantized (dynamically per token, or with a static observed range)."""

from __future__ import annotations

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc:: ops)
from slimc.ir.builder import call, getitems, tensor_val
from slimc.program import Program
from slimc.quant.qparams import QuantizedWeight
from slimc.quant.scheme import TensorQuantSpec

slimc_ops = torch.ops.slimc


def dequantized_weight(
    program: Program,
    node: fx.Node,
    qw: QuantizedWeight,
    spec: TensorQuantSpec,
    weight: torch.Tensor,
    path: str,
    origin: str,
) -> fx.Node:
    """`dequantize_affine` of the codes `qw` (stored as constants named after `path`), before
    `node`: the float weight [N, K] the linear reads instead of `weight`."""
    q = program.constant_node(program.unique_target(f"{path}.weight_q"), qw.qdata, node)
    s = program.constant_node(program.unique_target(f"{path}.weight_scale"), qw.scale, node)
    zp = None
    if qw.zero_point is not None:
        zp = program.constant_node(
            program.unique_target(f"{path}.weight_zero_point"), qw.zero_point, node
        )
    return call(
        program,
        slimc_ops.dequantize_affine.default,
        (q, spec.block_size(weight.shape), s, zp, spec.qmin, spec.qmax, weight.dtype),
        before=node,
        origin=origin,
    )


def quantized_input(
    program: Program,
    node: fx.Node,
    x: fx.Node,
    act: TensorQuantSpec,
    static_qparams: tuple[torch.Tensor, torch.Tensor] | None,
    path: str,
    origin: str,
) -> fx.Node:
    """`x` quantized and dequantized by `act` before `node`: per token at run time when the spec
    is dynamic, else with the observed `(scale, zero point)` stored as constants."""
    xval = tensor_val(x)
    block = act.block_size(xval.shape)
    if act.dynamic:
        qp = call(
            program,
            slimc_ops.choose_qparams_affine.default,
            (x, block, act.qmin, act.qmax, act.symmetric),
            before=node,
            origin=origin,
        )
        scale, zp = getitems(program, qp, 2, before=node)
    else:
        assert static_qparams is not None
        shape = [1] * xval.dim()
        s, z = static_qparams
        scale = program.constant_node(
            program.unique_target(f"{path}.input_scale"), s.reshape(shape).float(), node
        )
        zp = program.constant_node(
            program.unique_target(f"{path}.input_zero_point"),
            z.reshape(shape).to(torch.int32),
            node,
        )
    q = call(
        program,
        slimc_ops.quantize_affine.default,
        (x, block, scale, zp, act.qmin, act.qmax, torch.int8),
        before=node,
        origin=origin,
    )
    return call(
        program,
        slimc_ops.dequantize_affine.default,
        (q, block, scale, zp, act.qmin, act.qmax, xval.dtype),
        before=node,
        origin=origin,
    )
