"""lower-cpu: bind fused quantized linears to PyTorch's native int8 / int4 CPU kernels."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

import slimc.ops  # noqa: F401  (registers slimc:: ops)
from slimc.ir.builder import constant_value, new_constant
from slimc.kernel import KernelBinding
from slimc.lowering import (
    KernelCall,
    LoweringPass,
    NotLowerable,
    is_call,
    per_token_source,
    static_source,
)
from slimc.ops.fused import (
    LINEAR_W4A8,
    LINEAR_W4A16,
    LINEAR_W8A8,
    LINEAR_W8A16,
    FusedLinear,
    LinearArgs,
    bound_args,
)
from slimc.ops.packing import unpack_int4
from slimc.ops.rotate import rotation_scale
from slimc.pass_base import option
from slimc.program import Program
from slimc.registry import load_kernel_family

log = logging.getLogger(__name__)
cpu_kernels = load_kernel_family("cpu")  # registers the slimc::cpu_linear_* kernel ops
onednn = load_kernel_family("cpu.onednn")
int4_group_for = cpu_kernels.int4_group_for
prepare_int4 = cpu_kernels.prepare_int4
ops = torch.ops.slimc

INT4_M_THRESHOLD = 48
"""Rows up to which `_weight_int4pack_mm_for_cpu` beats dequantize + bf16 matmul (measured on
4096x4096: the int4 kernel costs ~0.24 ms per row, the compiled dequantize ~14.5 ms once)."""

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_ENGINE_TEXT = {"onednn": "oneDNN int8 linear", "int_mm": "torch._int_mm"}


@dataclass(frozen=True, kw_only=True)
class LowerCPU(LoweringPass):
    """Lower fused linears to native CPU kernels (`slimc::cpu_linear_*`).

    * dynamic W8A8 / W4A8 / W4A4 (int4 weights widened to int8 once): compiled per-token
      quantization, the int8 product on `int8-engine` (by default oneDNN's prepacked int8
      linear, `cpu.onednn`, for weights of 4M elements and more where torch has it and the
      CPU has VNNI or AMX, so its int32 sums are exact; else
      `torch._int_mm`, `cpu.int_mm`), compiled scale epilogue;
      the integer products are the reference's, so only the float epilogue's rounding differs;
    * the same behind an online input rotation (`slimc.hadamard`, from
      `quarot{online-inputs=...}`): the rotation runs inside the kernel op, computed as the
      reference computes it (fp32), its signs fused into the quantization;
    * static W8A8: the same with the static scale, zero point folded as zp * sum_k w;
    * W4A16: `_weight_int4pack_mm_for_cpu` up to `int4-m-threshold` rows, else a compiled
      dequantize + matmul; scales and zeros are held in `dtype` (bf16: about 0.4% of the
      output's range off the fp32 reference);
    * symmetric per-channel W8A16: `_weight_int8pack_mm` with scales in `dtype`.
    Linears no kernel takes (odd N for int4, unsupported group) stay fused, counted. Lossy
    (weight-only paths round scales to `dtype`); the int8 paths are exact up to float rounding.
    """

    name = "lower-cpu"
    device_type = "cpu"

    dtype: Literal["bf16", "fp32"] = option(
        "bf16", "dtype of weight-only scales and of the int4 / int8-weight kernels' inputs"
    )
    int4_m_threshold: int = option(
        INT4_M_THRESHOLD, "rows up to which W4A16 uses the int4 kernel (above: dequantize + mm)"
    )
    int8_engine: Literal["auto", "onednn", "int_mm"] = option(
        "auto",
        "int8 x int8 product of dynamic linears: oneDNN's prepacked int8 linear, torch._int_mm, "
        "or auto (oneDNN for weights of 4M elements and more, where this torch has it and the CPU "
        "has VNNI or AMX)",
    )

    def _engine(self, weight: torch.Tensor) -> str:
        if self.int8_engine == "auto":
            return onednn.default_engine(*weight.shape)
        return self.int8_engine

    def plan(self, program: Program, node: fx.Node, fused: FusedLinear) -> KernelCall:
        args = fused.read(node)
        if fused is LINEAR_W4A16:
            return self._int4_weight(program, node, args)
        if fused is LINEAR_W8A16:
            return self._int8_weight(program, node, args)
        static = static_source(args.input)
        if fused is LINEAR_W8A8 and static is not None:
            return self._static(program, node, args, static)
        return self._dynamic(program, node, fused, args)

    def _int4_weight(self, program: Program, node: fx.Node, fused: LinearArgs) -> KernelCall:
        try:
            packed, sz, kgroup = prepare_int4(
                _const(program, fused.weight),
                _const(program, fused.weight_scale),
                _const(program, fused.weight_zero_point),
                int(fused.group_size),
                _DTYPES[self.dtype],
            )
        except ValueError as exc:
            raise NotLowerable(str(exc)) from None
        args = (
            fused.input,
            new_constant(program, node, "cpu_int4pack", packed),
            new_constant(program, node, "cpu_scales_and_zeros", sz),
            fused.weight,
            kgroup,
            fused.bias,
            self.int4_m_threshold,
        )
        binding = KernelBinding(
            "cpu.int4pack_mm",
            {"group": kgroup, "m_threshold": self.int4_m_threshold, "dtype": self.dtype},
            reason=f"M <= {self.int4_m_threshold}: _weight_int4pack_mm_for_cpu; "
            "above: compiled dequantize + matmul",
        )
        return KernelCall(ops.cpu_linear_int4_weight.default, args, binding)

    def _int8_weight(self, program: Program, node: fx.Node, fused: LinearArgs) -> KernelCall:
        s = _const(program, fused.weight_scale)
        if fused.weight_zero_point is not None or int(fused.group_size) != -1 or s is None:
            raise NotLowerable("_weight_int8pack_mm takes symmetric per-channel weights only")
        args = (
            fused.input,
            fused.weight,
            new_constant(program, node, "cpu_scale", s.reshape(-1).to(_DTYPES[self.dtype])),
            fused.bias,
        )
        binding = KernelBinding("cpu.int8pack_mm", {"dtype": self.dtype}, "W8A16 per channel")
        return KernelCall(ops.cpu_linear_int8_weight.default, args, binding)

    def _dynamic(
        self, program: Program, node: fx.Node, kind: FusedLinear, fused: LinearArgs
    ) -> KernelCall:
        qweight = fused.weight
        x, qmax = per_token_source(fused.input)
        w = _const(program, qweight)
        scale = _const(program, fused.weight_scale).to(torch.float32).reshape(-1)
        if scale.numel() != w.shape[0]:
            raise NotLowerable(f"weight scale has {scale.numel()} values for N={w.shape[0]}")
        if kind is LINEAR_W4A8:  # int4 codes widened to int8 once, for torch._int_mm
            qweight = new_constant(program, node, "cpu_qweight_int8", unpack_int4(w).contiguous())
        engine = self._engine(w)
        w_scale = new_constant(program, node, "cpu_w_scale", scale)
        args = (x, qweight, w_scale, fused.bias, -qmax - 1, qmax, engine)
        if is_call(x, ops.hadamard.default):  # an online rotation: done by the kernel op
            return self._rotated(program, node, kind, args)
        binding = KernelBinding(
            f"cpu.{engine}",
            {"act": f"per-token [{-qmax - 1}, {qmax}]", "epilogue": "compiled"},
            reason=f"{kind.name}: compiled per-token quantization + {_ENGINE_TEXT[engine]} + scale "
            "epilogue",
        )
        return KernelCall(ops.cpu_linear_int8_dynamic.default, args, binding)

    def _rotated(
        self, program: Program, node: fx.Node, kind: FusedLinear, args: tuple[Any, ...]
    ) -> KernelCall:
        rotation = bound_args(args[0])
        values = _const(program, rotation["signs"])
        if values is None:
            raise NotLowerable("online rotation signs are not a constant")
        sign_scale = new_constant(program, node, "cpu_sign_scale", rotation_scale(values))
        engine = args[6]
        binding = KernelBinding(
            f"cpu.hadamard+{engine}",
            {
                "act": f"per-token [{args[4]}, {args[5]}]",
                "rotation": "fp32",
                "epilogue": "compiled",
            },
            reason=f"{kind.name} behind an online rotation: fp32 Hadamard + compiled per-token "
            f"quantization + {_ENGINE_TEXT[engine]} + scale epilogue",
        )
        return KernelCall(
            ops.cpu_linear_int8_dynamic_hadamard.default,
            (rotation["x"], sign_scale, *args[1:]),
            binding,
        )

    def _static(
        self,
        program: Program,
        node: fx.Node,
        fused: LinearArgs,
        source: tuple[fx.Node, int, int],
    ) -> KernelCall:
        x, qmin, qmax = source
        s = _const(program, fused.input_scale)
        if s is None or s.numel() != 1:
            raise NotLowerable("static activations must be quantized per tensor")
        zp = _const(program, fused.input_zero_point)
        zp = torch.zeros(1, dtype=torch.int32) if zp is None else zp.reshape(1).to(torch.int32)
        w = _const(program, fused.weight)
        w_sum = w.to(torch.int32).sum(dim=1, dtype=torch.int32)
        w_scale = _const(program, fused.weight_scale).reshape(-1)
        args = (
            x,
            fused.weight,
            new_constant(program, node, "cpu_x_scale", s.reshape(1).to(torch.float32)),
            new_constant(program, node, "cpu_x_zero_point", zp),
            new_constant(program, node, "cpu_w_sum", w_sum),
            new_constant(program, node, "cpu_w_scale", w_scale),
            fused.bias,
            qmin,
            qmax,
        )
        binding = KernelBinding(
            "cpu.int_mm",
            {"act": "static per-tensor", "epilogue": "compiled"},
            reason="linear_w8a8 static: compiled quantization + torch._int_mm + epilogue",
        )
        return KernelCall(ops.cpu_linear_int8_static.default, args, binding)


def _const(program: Program, arg: Any) -> torch.Tensor | None:
    return constant_value(program, arg, error=NotLowerable)


__all__ = ["LowerCPU", "int4_group_for"]
