"""AscendV1 tensors of one quantized linear: int4 packing, deq_scale encoding, mode tags.

The per-mode tensor table is in `slimc.export.ascend_v1`, which writes and reads the files.
"""

from __future__ import annotations

from typing import Any

import torch

from slimc.errors import UserError
from slimc.nn import QuantizedLinear
from slimc.ops.packing import unpack_int4
from slimc.quant.scheme import LinearQuantScheme

ROW_PARALLEL = ("down_proj", "o_proj", "w2")
"""Row-parallel linears: their W4A8 scale_bias is kept per chunk of K."""
SCALE_BIAS_CHUNKS = 16
PT2_HINT = "use format='pt2' (--format pt2) instead"


# --------------------------------------------------------------------------- encodings


def pack_int4_int8(q: torch.Tensor) -> torch.Tensor:
    """int4 values int8 [N, K] -> int8 [N, K // 2]: byte j = (q[2j] & 0xF) | (q[2j + 1] << 4)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {tuple(q.shape)}")
    u = q.to(torch.int16) & 0xF
    byte = u[..., 0::2] | (u[..., 1::2] << 4)
    return torch.where(byte >= 128, byte - 256, byte).to(torch.int8).contiguous()


def unpack_int4_int8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_int8`: int8 [N, K // 2] -> int8 [N, K] in [-8, 7]."""
    b = packed.to(torch.int16) & 0xFF
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)


def encode_deq_scale(deq: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """float32 deq_scale, or (non-bf16 models) its float32 bit pattern held in int64."""
    deq = deq.to(torch.float32).contiguous()
    return deq if model_dtype == torch.bfloat16 else deq.view(torch.int32).to(torch.int64)


def decode_deq_scale(t: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_deq_scale`."""
    if t.dtype == torch.int64:
        low = t & 0xFFFFFFFF
        low = torch.where(low >= 2**31, low - 2**32, low)
        return low.to(torch.int32).view(torch.float32)
    return t.to(torch.float32)


# --------------------------------------------------------------------------- modes


def ascend_mode(scheme: LinearQuantScheme) -> str:
    """The AscendV1 mode tag of a slimc linear scheme.

    Raises:
        UserError: AscendV1 has no mode for the scheme (the message names it).
    """
    w, a = scheme.weight, scheme.activation
    per_channel = w.granularity == "channel"
    if a is None:
        if w.granularity in ("channel", "group"):
            return "W8A16" if w.bits == 8 else "W4A16"
    elif a.dynamic and a.granularity == "token" and a.symmetric:
        if (
            a.bits == 8
            and w.bits == 8
            and (w.granularity == "group" or (per_channel and w.symmetric))
        ):
            return "W8A8_DYNAMIC"
        if a.bits == 8 and w.bits == 4 and per_channel and w.symmetric:
            return "W4A8_DYNAMIC"
        if a.bits == 4 and w.bits == 4 and w.granularity in ("channel", "group"):
            return "W4A4_DYNAMIC"
    elif not a.dynamic and a.granularity == "tensor" and a.bits == 8:
        return _static_mode(scheme)
    act = "float" if a is None else _spec_text(a) + (" dynamic" if a.dynamic else " static")
    raise UserError(
        f"scheme {scheme.name!r} (weights {_spec_text(w)}, activations {act}) has no AscendV1 "
        f"mode; {PT2_HINT}"
    )


def _static_mode(scheme: LinearQuantScheme) -> str:
    w = scheme.weight
    if w.bits == 8 and w.granularity == "channel" and w.symmetric:
        return "W8A8"
    raise UserError(
        f"scheme {scheme.name!r}: AscendV1's W8A8 needs int8 symmetric per-channel weights, got "
        f"{_spec_text(w)}; {PT2_HINT}"
    )


def _spec_text(spec: Any) -> str:
    kind = "symmetric" if spec.symmetric else "asymmetric"
    return f"int{spec.bits} {kind} per {spec.granularity}"


def _scale_bias(name: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    deq = q.to(torch.float32) * scale.to(torch.float32).reshape(-1, 1)
    n, k = deq.shape
    if name.rsplit(".", 1)[-1] in ROW_PARALLEL and k % SCALE_BIAS_CHUNKS == 0:
        return 8 * deq.reshape(n, SCALE_BIAS_CHUNKS, -1).sum(dim=-1)
    return 8 * deq.sum(dim=1, keepdim=True)


def linear_tensors(
    name: str, q: QuantizedLinear, model_dtype: torch.dtype
) -> tuple[str, dict[str, torch.Tensor]]:
    """(mode, {suffix: tensor}) for one quantized linear."""
    mode = ascend_mode(q.scheme)
    spec = q.scheme.weight
    qint = q.qweight if spec.bits == 8 else _unpack_slimc(q.qweight)
    scale = q.weight_scale.to(torch.float32).reshape(qint.shape[0], -1).contiguous()
    zp = q.weight_zero_point
    offset = torch.zeros_like(scale) if zp is None else zp.to(torch.float32).reshape(scale.shape)
    out: dict[str, torch.Tensor] = {
        "weight": pack_int4_int8(qint) if spec.bits == 4 else qint.contiguous(),
        "weight_scale": scale,
        "weight_offset": offset.contiguous(),
    }
    if mode == "W8A8":
        x_scale = q.input_scale.to(torch.float32).reshape(1)
        x_zp = torch.zeros(1) if q.input_zero_point is None else q.input_zero_point.float()
        deq = x_scale * scale.reshape(-1)
        correction = qint.to(torch.float64).sum(dim=1) * float(x_zp.reshape(-1)[0])
        qbias = -correction
        if q.bias is not None:
            qbias = q.bias.to(torch.float64) / deq.to(torch.float64) - correction
        out["input_scale"] = x_scale.contiguous()
        out["input_offset"] = x_zp.reshape(1).to(torch.float32).contiguous()
        out["deq_scale"] = encode_deq_scale(deq, model_dtype)
        out["quant_bias"] = torch.round(qbias).to(torch.int32).contiguous()
    if mode == "W4A8_DYNAMIC":
        out["scale_bias"] = _scale_bias(name, qint, scale).contiguous()
    if q.bias is not None:
        out["bias"] = q.bias.detach().to(torch.float32).contiguous()
    return mode, out


def _unpack_slimc(packed: torch.Tensor) -> torch.Tensor:
    return unpack_int4(packed)
