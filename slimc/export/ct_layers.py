"""compressed-tensors per-layer pieces shared by the streaming and the model-copy save."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from slimc.nn import QuantizedLinear
from slimc.ops.packing import unpack_int4

log = logging.getLogger(__name__)


def _unpacked_int(q: QuantizedLinear) -> torch.Tensor:
    return unpack_int4(q.qweight) if q.scheme.weight.bits == 4 else q.qweight


def compressed_linear(q: QuantizedLinear, ct_scheme: Any, dtype: torch.dtype) -> nn.Linear:
    """An `nn.Linear` holding `q` in compressed-tensors' compressed layout (weight_packed, ...).

    The library's compressor quantizes the float weight it is given with the scale / zero point
    on the module; it is given slimc's dequantized weight and slimc's qparams, so it recovers
    slimc's integers (checked exactly afterwards).
    """
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import (
        initialize_module_for_quantization,
    )

    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    lin.weight = nn.Parameter(q.dequantized_weight().to(torch.float32), requires_grad=False)
    if q.bias is not None:
        lin.bias = nn.Parameter(q.bias.detach().to(dtype), requires_grad=False)
    initialize_module_for_quantization(lin, copy.deepcopy(ct_scheme), force_zero_point=False)
    with torch.no_grad():
        _load_qparam(lin, "weight_scale", q.weight_scale)
        if q.weight_zero_point is not None:
            _load_qparam(lin, "weight_zero_point", q.weight_zero_point)
        if q.input_scale is not None:
            _load_qparam(lin, "input_scale", q.input_scale)
            if hasattr(lin, "input_zero_point") and q.input_zero_point is not None:
                _load_qparam(lin, "input_zero_point", q.input_zero_point)
    lin.quantization_status = QuantizationStatus.FROZEN
    compress_module(lin)
    _check_integers(lin, q)
    for name in ("weight_scale", "input_scale"):
        p = getattr(lin, name, None)
        if p is not None and p.dtype != dtype:
            setattr(lin, name, nn.Parameter(p.data.to(dtype), requires_grad=False))
    return lin


def _load_qparam(lin: nn.Module, name: str, value: torch.Tensor) -> None:
    param = getattr(lin, name)
    if param.numel() != value.numel():
        raise ValueError(
            f"{name}: compressed-tensors expects shape {tuple(param.shape)}, slimc has "
            f"{tuple(value.shape)}"
        )
    param.data = value.detach().reshape(param.shape).to(param.dtype).clone()


def _check_integers(lin: nn.Module, q: QuantizedLinear) -> None:
    """Raise if the compressed integers differ from slimc's (they must be bit-identical)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits = q.scheme.weight.bits
    ours = _unpacked_int(q)
    if hasattr(lin, "weight_packed"):
        saved = unpack_from_int32(lin.weight_packed.data, bits, ours.shape)
    else:
        saved = lin.weight.data
    ok = torch.equal(saved.to(torch.int8), ours.to(torch.int8))
    zp = getattr(lin, "weight_zero_point", None)
    if ok and q.weight_zero_point is not None and zp is not None:
        if zp.dtype == torch.int32:  # packed along the output dim
            zp = unpack_from_int32(zp.data, bits, q.weight_zero_point.shape, packed_dim=0)
        ok = torch.equal(
            zp.to(torch.int8).reshape(q.weight_zero_point.shape), q.weight_zero_point.to(torch.int8)
        )
    if not ok:
        raise RuntimeError("compressed-tensors produced integers that differ from slimc's")


def _output_embedding_name(model: nn.Module) -> str | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if out is not None and mod is out:
            return name
    return None


def model_copy(
    model: nn.Module,
    quantized: dict[str, QuantizedLinear],
    swap: Any,
    extra_memo: dict[int, Any] | None = None,
) -> nn.Module:
    """A copy of `model` sharing its tensors, with each quantized linear `q` replaced by swap(q)
    (and each object whose id `extra_memo` holds by what it maps to)."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    memo.update({id(q): swap(q) for q in quantized.values()})
    memo.update(extra_memo or {})
    program = getattr(model, "slimc_program", None)
    if program is not None:
        memo[id(program)] = None
    work = copy.deepcopy(model, memo)
    if "slimc_program" in vars(work):
        delattr(work, "slimc_program")
    if getattr(work.config, "quantization_config", None) is not None:
        del work.config.quantization_config
    _untie_if_quantized(work, quantized)
    return work


def _untie_if_quantized(work: nn.Module, quantized: dict[str, QuantizedLinear]) -> None:
    """A quantized output projection cannot stay tied to the float input embedding."""
    name = _output_embedding_name(work)
    if name in quantized and getattr(work.config, "tie_word_embeddings", False):
        log.info("%s is quantized: saving with tie_word_embeddings=false", name)
        work.config.tie_word_embeddings = False
        text_config = getattr(work.config, "get_text_config", lambda: None)()
        if text_config is not None and text_config is not work.config:
            text_config.tie_word_embeddings = False


def generation_config(model: nn.Module) -> Any:
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None)
    return gen if gen is not None else GenerationConfig.from_model_config(model.config)
