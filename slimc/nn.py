"""Runtime modules that replace float layers in a user's model after compilation."""

from __future__ import annotations

import torch
from torch import nn

from slimc.kernel import eager_impl
from slimc.ops.experts import per_expert
from slimc.ops.fused import LinearArgs, fused_linear_for
from slimc.ops.packing import pack_int4, unpack_int4
from slimc.quant.scheme import LinearQuantScheme


class QuantizedLinear(nn.Module):
    """A linear layer whose weight (and optionally input) is quantized; calls `slimc::` ops.

    Buffers:
        qweight: int8 [N, K] for 8-bit weights, packed uint8 [N, K // 2] for 4-bit weights.
        weight_scale: float32 [N, G] (G = 1 per channel, K // group_size per group).
        weight_zero_point: int8 [N, G] or absent for symmetric weights.
        input_scale / input_zero_point: float32 [1] / int32 [1] for static activations.
        bias: optional float bias.

    Attributes:
        replaced_type: class name of the float layer this one replaced when that was not an
            `nn.Linear` (GPT-2's `Conv1D`), else None; such a layer has no compressed-tensors form.
    """

    replaced_type: str | None = None

    def __init__(
        self,
        scheme: LinearQuantScheme,
        in_features: int,
        out_features: int,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_zero_point: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        input_zero_point: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_zero_point", weight_zero_point)
        self.register_buffer("bias", bias)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("input_zero_point", input_zero_point)

    @classmethod
    def from_codes(
        cls,
        scheme: LinearQuantScheme,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_zero_point: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        input_zero_point: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        """The layer of integer codes `qweight` [N, K] (int4 values unpacked) and their scales;
        static input ranges of any shape with one element."""
        n, k = qweight.shape
        return cls(
            scheme,
            k,
            n,
            pack_int4(qweight) if scheme.weight.bits == 4 else qweight,
            weight_scale,
            weight_zero_point,
            bias,
            None if input_scale is None else input_scale.reshape(-1),
            None if input_zero_point is None else input_zero_point.reshape(-1),
        )

    @property
    def group_size(self) -> int:
        return self.scheme.weight.group_size

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.scheme.name}, group_size={self.group_size}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # buffers are read in the fused op's argument order: Dynamo lifts them in that order
        ops = torch.ops.slimc
        act, fused = self.scheme.activation, fused_linear_for(self.scheme)
        if act is None:
            args = LinearArgs(
                x,
                weight=self.qweight,
                weight_scale=self.weight_scale,
                weight_zero_point=self.weight_zero_point,
                group_size=self.group_size,
                bias=self.bias,
            )
            return fused.packet(*fused.call_args(args))
        if act.dynamic:
            xq, x_scale = ops.quantize_per_token(x, act.qmin, act.qmax)
            input_zero_point = None
        else:
            block = act.block_size(x.shape)
            xq = ops.quantize_affine(
                x, block, self.input_scale, self.input_zero_point, act.qmin, act.qmax, torch.int8
            )
            x_scale, input_zero_point = self.input_scale, self.input_zero_point
        args = LinearArgs(
            xq,
            input_scale=x_scale,
            input_zero_point=input_zero_point,
            weight=self.qweight,
            weight_scale=self.weight_scale,
            bias=self.bias,
            out_dtype=x.dtype,
        )
        return fused.packet(*fused.call_args(args))

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight [N, K] this layer computes with."""
        q = unpack_int4(self.qweight) if self.scheme.weight.bits == 4 else self.qweight
        spec = self.scheme.weight
        return torch.ops.slimc.dequantize_affine(
            q,
            spec.block_size(q.shape),
            self.weight_scale,
            self.weight_zero_point,
            spec.qmin,
            spec.qmax,
            torch.float32,
        )


class OutputBias(nn.Module):
    """A module followed by a per-channel bias: what asymmetric smoothing adds after a norm.

    The wrapped module keeps its own parameters (`module.weight` etc.); `bias` is added to its
    output along the last dimension.
    """

    def __init__(self, module: nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.module(*args, **kwargs) + self.bias


class HadamardRotation(nn.Module):
    """A module whose output is rotated at run time: `slimc::hadamard(module(x), signs)`.

    What `quarot{online=true}` adds after a module whose output enters the residual stream but
    that no weight can rotate (a sandwich norm). The wrapped module keeps its own parameters.
    """

    def __init__(self, module: nn.Module, signs: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("signs", signs.detach().clone())

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.ops.slimc.hadamard(self.module(*args, **kwargs), self.signs)


class HadamardInputRotation(nn.Module):
    """A linear whose input is rotated at run time: `module(slimc::hadamard(x, signs))`.

    What `quarot{online-inputs=...}` adds in front of a linear (down_proj) whose weight absorbed
    the inverse rotation; the wrapped module may be a float or a quantized linear.
    """

    def __init__(self, module: nn.Module, signs: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("signs", signs.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(torch.ops.slimc.hadamard(x, self.signs))


class KernelLinear(nn.Module):
    """A quantized linear lowered to one kernel op: `op(x, *args)` with constant args as buffers.

    What write-back makes of a node a lowering pass bound to a kernel (see `slimc.kernel`).
    `arg_spec` lists the op's arguments after `x`: ("buffer", name) for a tensor held here,
    ("value", literal) for anything else. `replaced_type` as for `QuantizedLinear`.
    """

    replaced_type: str | None = None

    def __init__(
        self,
        op_name: str,
        kernel: str,
        in_features: int,
        out_features: int,
        arg_spec: list[tuple[str, object]],
        buffers: dict[str, torch.Tensor],
    ) -> None:
        super().__init__()
        self.op_name = op_name
        self.kernel = kernel
        self.in_features = in_features
        self.out_features = out_features
        self.arg_spec = list(arg_spec)
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
        namespace, _, rest = op_name.partition("::")
        packet, _, overload = rest.partition(".")
        self._op = getattr(getattr(getattr(torch.ops, namespace), packet), overload or "default")
        self._op_key = op_name.partition(".")[0]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel={self.kernel}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = [getattr(self, v) if kind == "buffer" else v for kind, v in self.arg_spec]
        eager = eager_impl(self._op_key)
        if eager is not None and self._plain_eager_call(x, eager[0]):
            return eager[1](x, *args)
        return self._op(x, *args)

    @staticmethod
    def _plain_eager_call(x: torch.Tensor, device_type: str) -> bool:
        """Whether this call is plain eager execution (not traced, exported or compiled)."""
        return (
            type(x) is torch.Tensor
            and x.device.type == device_type
            and not x.requires_grad
            and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
        )


class QuantizedExperts(nn.Module):
    """A transformers experts module (stacked `gate_up_proj` / `up_proj` / `down_proj` weights
    [E, N, K], routed rows in, weighted sum out) whose stacks are quantized: one
    `QuantizedLinear` per expert and stack, run on the rows routed to that expert.

    The wrapped float module keeps its gate or activation, its optional post-expert norm and any
    stack left in float; the quantized stacks (and their biases) are removed from it.
    """

    def __init__(self, module: nn.Module, quantized: dict[str, list[QuantizedLinear]]) -> None:
        super().__init__()
        self.module = module
        self.quantized = nn.ModuleDict({k: nn.ModuleList(v) for k, v in quantized.items()})
        for name in quantized:
            module._parameters.pop(name, None)
            module._parameters.pop(f"{name}_bias", None)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        inner, k = self.module, top_k_index.shape[-1]
        if hidden_states.shape[0] == 0:
            return torch.zeros_like(hidden_states)
        x = hidden_states.repeat_interleave(k, dim=0)
        ids = top_k_index.reshape(-1)
        h = self._product("gate_up_proj" if inner.has_gate else "up_proj", x, ids)
        h = inner._apply_gate(h) if inner.has_gate else inner.act_fn(h)
        h = self._product("down_proj", h, ids)
        if getattr(inner, "has_post_expert_norm", False):
            h = inner.post_expert_norm(h)
        h = h * top_k_weights.reshape(-1, 1).to(h.dtype)
        return h.view(hidden_states.shape[0], k, -1).sum(dim=1).to(hidden_states.dtype)

    def _product(self, name: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if name in self.quantized:
            linears = self.quantized[name]
            return per_expert(x, ids, len(linears), lambda e, rows: linears[e](rows))
        inner = self.module
        weight = getattr(inner, name)
        weight = weight.transpose(-2, -1) if inner.is_transposed else weight
        bias = getattr(inner, f"{name}_bias") if inner.has_bias else None
        return torch.ops.slimc.expert_linear(x, weight, ids, bias)
