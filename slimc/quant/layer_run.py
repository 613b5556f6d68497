"""Running one decoder layer's region on recorded inputs, with run-time activation quantization.

Shared by the passes and analyses that compare a layer's quantized outputs with its float ones
(AutoRound's training loss, the layer sensitivity ranking).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx

import slimc.ops  # noqa: F401  (registers the slimc:: ops read below)
from slimc.errors import UserError
from slimc.quant.scheme import TensorQuantSpec
from slimc.smooth.region import Region

slimc_ops = torch.ops.slimc

ActQuant = Callable[[Tensor], Tensor]
Env = dict[fx.Node, Any]


def act_fake_quant(
    act: TensorQuantSpec, static_qparams: tuple[Tensor, Tensor] | None, device: str
) -> ActQuant:
    """A linear input's run-time quantization (the `slimc::*_affine` ops), straight-through.

    Dynamic specs choose their scales per token; static ones use the observed `(scale, zp)`.
    The gradient passes unchanged to the input.
    """
    fixed = None
    if static_qparams is not None:
        fixed = tuple(t.detach().reshape(-1).to(device) for t in static_qparams)

    def fake_quant(x: Tensor) -> Tensor:
        xd = x.detach()
        block = act.block_size(xd.shape)
        if fixed is None:
            scale, zp = slimc_ops.choose_qparams_affine(
                xd, block, act.qmin, act.qmax, act.symmetric
            )
        else:
            shape = [1] * xd.dim()
            scale, zp = fixed[0].float().reshape(shape), fixed[1].to(torch.int32).reshape(shape)
        q = slimc_ops.quantize_affine(xd, block, scale, zp, act.qmin, act.qmax, torch.int8)
        dq = slimc_ops.dequantize_affine(q, block, scale, zp, act.qmin, act.qmax, x.dtype)
        return dq + (x - xd)

    return fake_quant


def run_region(
    region: Region, values: Mapping[fx.Node, Any], act_quant: Mapping[fx.Node, ActQuant]
) -> list[Any]:
    """Run the region's nodes (autograd allowed) on `values` (its inputs and constants).

    The first argument of every node in `act_quant` goes through that function first.
    """
    env: Env = dict(values)
    get = env.__getitem__
    for node in region.nodes:
        args = fx.node.map_arg(node.args, get)
        kwargs = fx.node.map_arg(node.kwargs, get)
        fq = act_quant.get(node)
        if fq is not None:
            args = (fq(args[0]), *args[1:])
        if node.target in NO_GRAD_QUANT_OPS:
            args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        out = node.target(*args, **kwargs)  # type: ignore[operator]
        env[node] = straight_through(node, out, env)
    return [env[n] for n in region.outputs]


NO_GRAD_QUANT_OPS = (
    slimc_ops.choose_qparams_affine.default,
    slimc_ops.quantize_affine.default,
    slimc_ops.quantize_per_token.default,
)


def straight_through(node: fx.Node, out: Any, env: Env) -> Any:
    """An activation quantize -> dequantize pair already in the graph (a linear an earlier
    quantizer pass handled) passes the gradient straight through to its input."""
    quant = node.args[0] if node.target is slimc_ops.dequantize_affine.default else None
    if not (isinstance(quant, fx.Node) and quant.target is slimc_ops.quantize_affine.default):
        return out
    x = env.get(quant.args[0]) if isinstance(quant.args[0], fx.Node) else None
    if not isinstance(x, Tensor) or not x.requires_grad:
        return out
    return out + (x - x.detach()).to(out.dtype)


def upstream(nodes: Sequence[fx.Node], wanted: Iterable[fx.Node]) -> list[fx.Node]:
    """The nodes of `nodes` that `wanted` depend on (themselves included), in order."""
    inside = set(nodes)
    keep: set[fx.Node] = set()
    stack = list(wanted)
    while stack:
        n = stack.pop()
        if n in inside and n not in keep:
            keep.add(n)
            stack.extend(n.all_input_nodes)
    return [n for n in nodes if n in keep]


def float_references(
    region: Region,
    inputs: Sequence[Mapping[fx.Node, Any]],
    consts: Mapping[fx.Node, Any],
    floats: Sequence[Env],
) -> list[list[Any]]:
    """The float region's outputs per sample, run on the float model's values.

    `floats[i]` holds, for sample `i`, the float model's value of every node whose value in
    the (partly quantized) calibration run differs; those replace the recorded `inputs`, and
    the region's outputs are added to it.
    """
    refs = []
    with torch.no_grad():
        for env, x in zip(floats, inputs, strict=True):
            float_in = {n: env.get(n, v) for n, v in x.items()}
            refs.append(run_region(region, {**float_in, **consts}, {}))
            env.update(zip(region.outputs, refs[-1], strict=True))
    return refs


def output_loss(outs: Sequence[Any], refs: Sequence[Any]) -> Tensor:
    """Mean squared error (in float32) over the floating outputs, averaged over outputs."""
    terms = [
        torch.nn.functional.mse_loss(o.float(), r.float())
        for o, r in zip(outs, refs, strict=True)
        if isinstance(r, Tensor) and r.is_floating_point()
    ]
    if not terms:
        raise UserError("autoround: a decoder layer has no floating-point output to match")
    return torch.stack(terms).mean()
