"""lower-npu: bind fused quantized linears to Ascend NPU kernels (torch_npu ops) on re-laid-out weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc:: ops)
from slimc.ir.builder import constant_value, new_constant
from slimc.kernel import KernelBinding
from slimc.lowering import (
    KernelCall,
    LoweringPass,
    NotLowerable,
    per_token_source,
    static_source,
)
from slimc.ops.fused import LINEAR_W8A8, FusedLinear, LinearArgs
from slimc.pass_base import option
from slimc.program import SCHEME_KEY, Program, node_loc
from slimc.quant.scheme import LinearQuantScheme
from slimc.registry import load_kernel_family

log = logging.getLogger(__name__)
npu_kernels = load_kernel_family("npu")  # registers the slimc::npu_linear_* kernel ops
layout = npu_kernels.layout
decode_quant_scale = npu_kernels.emulate.decode_quant_scale
ops = torch.ops.slimc

QUANT_MATMUL = "npu.quant_matmul"
WEIGHT_QUANT_BMM = "npu.weight_quant_batchmatmul"


@dataclass(frozen=True, kw_only=True)
class LowerNPU(LoweringPass):
    """Lower fused linears to torch_npu kernels (`slimc::npu_linear_*`, emulated off-NPU).

    Each fused linear and its activation quantization become one kernel op on constants laid
    out as torch_npu reads them: weights [K, N] (int4 as `npu_convert_weight_to_int4pack`
    words), per-channel scales [N], antiquant scales/offsets [G, N] with offset = -zero point,
    and for static W8A8 a `deq_scale` plus an int32 `quant_bias`. Lossy: a static layer's float
    bias is rounded to a multiple of its deq_scale (as msModelSlim's `quant_bias`), float16
    outputs read the deq_scale through `npu_trans_quant_param` (19 bits), and weight-only
    antiquant scales are stored in the activation dtype (exact for float32 models). Every
    integer product and every dynamic quantization is unchanged.
    """

    name = "lower-npu"
    device_type = "npu"
    refusal_level = logging.WARNING

    strict: bool = option(
        False, "fail on a fused linear no NPU kernel can take, instead of leaving it fused"
    )

    def refuse(self, program: Program, node: fx.Node, exc: NotLowerable) -> None:
        if self.strict:
            raise NotLowerable(f"lower-npu: {node_loc(node) or node.name}: {exc}") from None
        super().refuse(program, node, exc)

    # -- one fused linear --------------------------------------------------------------------
    def plan(self, program: Program, node: fx.Node, fused: FusedLinear) -> KernelCall:
        scheme: LinearQuantScheme = node.meta[SCHEME_KEY]
        args = fused.read(node)
        if not fused.quantized_input:
            return self._weight_only(program, node, scheme, fused, args)
        static = static_source(args.input)
        if fused is LINEAR_W8A8 and static is not None:
            return self._static(program, node, args, static)
        return self._dynamic(program, node, scheme, fused, args)

    def _weight_only(
        self,
        program: Program,
        node: fx.Node,
        scheme: LinearQuantScheme,
        kind: FusedLinear,
        fused: LinearArgs,
    ) -> KernelCall:
        x, group = fused.input, fused.group_size
        dtype = x.meta["val"].dtype
        bits = scheme.weight.bits
        w = _const(program, fused.weight)
        if bits == 4:
            try:
                weight = layout.int4pack_kn(w)
            except ValueError as exc:
                raise NotLowerable(str(exc)) from None
        else:
            weight = layout.int8_kn(w, 8)
        s, off = layout.antiquant_params(
            _const(program, fused.weight_scale), _const(program, fused.weight_zero_point), dtype
        )
        g = int(group) if int(group) > 0 else 0
        args = (
            x,
            new_constant(program, node, "npu_weight", weight),
            new_constant(program, node, "npu_antiquant_scale", s),
            None if off is None else new_constant(program, node, "npu_antiquant_offset", off),
            g,
            fused.bias,
        )
        op = ops.npu_linear_w4a16.default if bits == 4 else ops.npu_linear_w8a16.default
        binding = KernelBinding(
            WEIGHT_QUANT_BMM,
            {"weight": "int4pack" if bits == 4 else "int8", "group_size": g},
            reason=f"{kind.name}: float activations, weight dequantized inside the matmul",
        )
        return KernelCall(op, args, binding)

    def _dynamic(
        self,
        program: Program,
        node: fx.Node,
        scheme: LinearQuantScheme,
        kind: FusedLinear,
        fused: LinearArgs,
    ) -> KernelCall:
        x, qmax = per_token_source(fused.input)
        bits = scheme.weight.bits
        w = _const(program, fused.weight)
        n = w.shape[0]
        scale = _const(program, fused.weight_scale).to(torch.float32).reshape(-1)
        if scale.numel() != n:
            raise NotLowerable(f"weight scale has {scale.numel()} values for N={n} channels")
        if qmax == 7 and bits == 4:
            k = x.meta["val"].shape[-1]
            if not isinstance(k, int) or k % 8 != 0:
                raise NotLowerable(f"int4 activations need K divisible by 8, got K={k}")
            try:
                weight = layout.int4pack_kn(w)
            except ValueError as exc:
                raise NotLowerable(str(exc)) from None
            op, config = ops.npu_linear_w4a4_dynamic.default, {"act": "int4", "weight": "int4pack"}
        elif qmax == 127:
            weight = layout.int8_kn(w, bits)
            if bits == 4:
                op, config = ops.npu_linear_w4a8_dynamic.default, {"weight": "int4-in-int8"}
            else:
                op, config = ops.npu_linear_w8a8_dynamic.default, {"weight": "int8"}
            config["act"] = "int8"
        else:
            raise NotLowerable(
                f"per-token activations in [{-qmax - 1}, {qmax}] with {bits}-bit weights "
                "have no NPU kernel"
            )
        args = (
            x,
            new_constant(program, node, "npu_weight", weight),
            new_constant(program, node, "npu_weight_scale", scale.contiguous()),
            fused.bias,
        )
        binding = KernelBinding(
            QUANT_MATMUL,
            {**config, "quant": "npu_dynamic_quant"},
            reason=f"{kind.name}: per-token dynamic activations x per-channel weights",
        )
        return KernelCall(op, args, binding)

    def _static(
        self,
        program: Program,
        node: fx.Node,
        fused: LinearArgs,
        source: tuple[fx.Node, int, int],
    ) -> KernelCall:
        x, qmin, qmax = source
        if (qmin, qmax) != (-128, 127):
            raise NotLowerable(f"static activations in [{qmin}, {qmax}] are not int8")
        s = _const(program, fused.input_scale)
        if s.numel() != 1:
            raise NotLowerable("static activations must be quantized per tensor")
        zp = _const(program, fused.input_zero_point)
        weight = layout.int8_kn(_const(program, fused.weight), 8)
        deq = layout.deq_scale(s, _const(program, fused.weight_scale), fused.out_dtype)
        bias = _const(program, fused.bias)
        qbias = layout.quant_bias(weight, zp, bias, decode_quant_scale(deq))
        offset = torch.zeros(1, dtype=torch.int32) if zp is None else zp.reshape(1).to(torch.int32)
        args = (
            x,
            new_constant(program, node, "npu_input_scale", s.reshape(1).to(torch.float32)),
            new_constant(program, node, "npu_input_offset", offset.contiguous()),
            new_constant(program, node, "npu_weight", weight),
            new_constant(program, node, "npu_deq_scale", deq),
            None if qbias is None else new_constant(program, node, "npu_quant_bias", qbias),
        )
        binding = KernelBinding(
            QUANT_MATMUL,
            {"act": "int8-static", "deq_scale": "i64" if deq.dtype == torch.int64 else "f32"},
            reason="linear_w8a8: static per-tensor activations (npu_quantize), folded quant_bias",
        )
        return KernelCall(ops.npu_linear_w8a8.default, args, binding)


def _const(program: Program, arg: Any) -> torch.Tensor | None:
    return constant_value(program, arg, error=NotLowerable)
