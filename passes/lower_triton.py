"""lower-triton: bind fused quantized linears to the Triton kernels and their static configs."""

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
    bound_args,
)
from slimc.ops.packing import unpack_int4
from slimc.pass_base import option
from slimc.program import Program
from slimc.registry import load_kernel_family

log = logging.getLogger(__name__)
ops = torch.ops.slimc
hadamard_quant = load_kernel_family("hadamard_quant")
w4a16 = load_kernel_family("w4a16")
w8a8 = load_kernel_family("w8a8")


def _default_device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "default"


@dataclass(frozen=True, kw_only=True)
class LowerTriton(LoweringPass):
    """Lower fused linears to Triton kernel ops (`slimc::triton_linear_*`) with static configs.

    * W4A16 -> `triton_linear_w4a16` (GEMV / split-K, tensor-core GEMM or dequantize + cuBLAS,
      chosen by the family's `select` for (N, K, M) on `device`);
    * dynamic W8A8 / W4A8 / W4A4 -> `triton_linear_w8a8_dynamic` (per-token quantization inside;
      int4 weights widened to int8 once); static W8A8 -> `triton_linear_w8a8_static`;
    * a dynamic linear whose input is an online rotation (`slimc.hadamard`, what
      `quarot{online-inputs=...}` leaves) -> `triton_linear_w8a8_hadamard`: the rotation and
      the per-token quantization run in one hadamard_quant kernel, then the int8 GEMM.
    When the activation's row count is not static, the binding is the family's `auto` kernel,
    which chooses per call. On CUDA the ops launch the bound kernel; elsewhere they run the
    reference ops. W8A16 has no Triton kernel and stays fused (counted). Lossy only by float
    accumulation order: the GPU kernels round differently from the reference ops.
    """

    name = "lower-triton"
    device_type = "cuda"

    device: str = option("", "GPU name whose config table to use (empty: the current CUDA device)")

    def plan(self, program: Program, node: fx.Node, fused: FusedLinear) -> KernelCall:
        op, args, binding = self._plan(program, node, fused, self.device or _default_device())
        return KernelCall(op, args, binding)

    def _plan(
        self, program: Program, node: fx.Node, kind: FusedLinear, device: str
    ) -> tuple[Any, tuple[Any, ...], KernelBinding]:
        out_dtype = node.meta["val"].dtype
        fused = kind.read(node)
        qweight, w_scale, bias = fused.weight, fused.weight_scale, fused.bias
        if kind is LINEAR_W8A16:
            raise NotLowerable("no Triton kernel for int8 weight-only linears")
        if kind is LINEAR_W4A16:
            x, zp, group = fused.input, fused.weight_zero_point, int(fused.group_size)
            n, k = _const(program, qweight).shape[0], _const(program, qweight).shape[1] * 2
            sel = w4a16.select_explained(n, k, _rows(x), group, device)
            values = w4a16.config_values(sel.kernel, sel.config)
            args = (x, qweight, w_scale, zp, group, bias, sel.kernel, values)
            return ops.triton_linear_w4a16.default, args, _binding(sel)
        static = static_source(fused.input)
        if kind is LINEAR_W8A8 and static is not None:
            x, qmin, qmax = static
            n, k = _const(program, qweight).shape
            sel = w8a8.select_explained(n, k, _rows(x), device)
            values = w8a8.config_values(sel.kernel, sel.config)
            args = (x, fused.input_scale, fused.input_zero_point, qweight, w_scale, bias)
            args += (qmin, qmax, sel.kernel, values, out_dtype)
            return ops.triton_linear_w8a8_static.default, args, _binding(sel)
        if kind is LINEAR_W4A8:
            widened = unpack_int4(_const(program, qweight)).contiguous()
            qweight = new_constant(program, node, "qweight_int8", widened)
        x, qmax = per_token_source(fused.input)
        n, k = _const(program, qweight).shape
        sel = w8a8.select_explained(n, k, _rows(x), device)
        values = w8a8.config_values(sel.kernel, sel.config)
        if is_call(x, ops.hadamard.default):  # an online rotation: fused into the quantization
            rotation = bound_args(x)
            rot = hadamard_quant.select_explained(k, _rows(x), device)
            rot_values = hadamard_quant.config_values(rot.kernel, rot.config)
            args = (rotation["x"], rotation["signs"], qweight, w_scale, bias, -qmax - 1, qmax)
            args += (rot.kernel,)
            args += (rot_values, sel.kernel, values, out_dtype)
            binding = KernelBinding(
                f"triton.{rot.kernel}+{sel.kernel}",
                {**{f"rotate_{key}": v for key, v in rot.config.items()}, **sel.config},
                reason=f"rotation: {rot.reason}; GEMM: {sel.reason}",
            )
            return ops.triton_linear_w8a8_hadamard.default, args, binding
        args = (x, qweight, w_scale, bias, -qmax - 1, qmax, sel.kernel, values, out_dtype)
        return ops.triton_linear_w8a8_dynamic.default, args, _binding(sel)


def _const(program: Program, node: Any) -> torch.Tensor:
    value = constant_value(program, node, error=NotLowerable)
    if value is None:
        raise NotLowerable("argument None is not a constant")
    return value


def _rows(x: fx.Node) -> int | None:
    """The activation's row count (product of leading dims) when static, else None."""
    val = x.meta.get("val")
    rows = 1
    for d in val.shape[:-1]:
        if not isinstance(d, int):
            return None
        rows *= d
    return rows


def _binding(sel: Any) -> KernelBinding:
    return KernelBinding(f"triton.{sel.kernel}", dict(sel.config), reason=sel.reason)
