"""Stream a slimc-quantized HF model into a compressed-tensors checkpoint, one linear at a time."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimc.export.ct_layers import compressed_linear, generation_config, model_copy
from slimc.export.shards import ShardUnit, write_sharded_checkpoint
from slimc.nn import QuantizedLinear
from slimc.quant.scheme import LinearQuantScheme

__all__ = [
    "float_unit",
    "placeholder",
    "quantized_unit",
    "save_streaming",
    "streaming_blocker",
    "write_configs",
]

log = logging.getLogger(__name__)

# compressed-tensors writes at most weight(_packed), weight_shape, weight_scale,
# weight_zero_point, weight_g_idx, input_scale, input_zero_point, bias per linear; 10 bounds it
_MAX_TENSORS_PER_LINEAR = 10


def streaming_blocker(model: nn.Module) -> str | None:
    """Why `model` cannot be streamed with its module names as checkpoint names, or None."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    if getattr(model, "_weight_conversions", None):
        return f"{type(model).__name__} renames its weights on disk (weight conversions)"
    conversions = get_model_conversion_mapping(model, add_legacy=False)
    if any(not isinstance(c, PrefixChange) for c in conversions or []):
        return f"{type(model).__name__} renames its weights on disk (conversion mapping)"
    if getattr(model, "_checkpoint_conversion_mapping", None):
        return f"{type(model).__name__} has a checkpoint conversion mapping"
    if getattr(model, "hf_device_map", None) or getattr(model, "_hf_peft_config_loaded", False):
        return "the model is offloaded or carries adapters"
    if getattr(model, "hf_quantizer", None) is not None:
        return "the model was loaded through a transformers quantizer"
    if model.is_remote_code():
        return "the model class is remote code"
    return None


def placeholder(q: QuantizedLinear, ct_scheme: Any, dtype: torch.dtype) -> nn.Linear:
    """A weightless (meta) `nn.Linear` carrying the compressed-tensors scheme of `q`.

    It stands in for the compressed linear where compressed-tensors reads the module tree to
    build the `quantization_config` (schemes, formats, ignore list, status).
    """
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import (
        initialize_module_for_quantization,
    )

    lin = nn.Linear(
        q.in_features, q.out_features, bias=q.bias is not None, device="meta", dtype=dtype
    )
    initialize_module_for_quantization(lin, copy.deepcopy(ct_scheme), force_zero_point=False)
    lin.quantization_status = QuantizationStatus.COMPRESSED
    return lin


def quantized_unit(
    name: str, q: QuantizedLinear, ct_scheme: Any, dtype: torch.dtype, counts: dict[str, int]
) -> ShardUnit:
    def tensors() -> Iterable[tuple[str, torch.Tensor]]:
        lin = compressed_linear(q, ct_scheme, dtype)
        counts["total_parameters"] += sum(p.numel() for p in lin.parameters())
        return [(f"{name}.{key}", value) for key, value in lin.state_dict().items()]

    nbytes = sum(t.numel() * t.element_size() for t in (*q.parameters(), *q.buffers()))
    return ShardUnit(nbytes, tensors, [name], max_tensors=_MAX_TENSORS_PER_LINEAR)


def float_unit(key: str, tensor: torch.Tensor) -> ShardUnit:
    """One float tensor, written as it is."""
    return ShardUnit(tensor.numel() * tensor.element_size(), lambda: [(key, tensor)], [key])


def _units(
    skeleton: nn.Module,
    quantized: dict[str, QuantizedLinear],
    ct_schemes: dict[LinearQuantScheme, Any],
    dtype: torch.dtype,
    counts: dict[str, int],
) -> list[ShardUnit]:
    """The checkpoint in state-dict order: float tensors as `save_pretrained` keeps them (ignored
    keys and tied duplicates dropped), each quantized linear as one unit compressed on demand."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = skeleton.state_dict()
    floats = {k: v for k, v in state.items() if k.rpartition(".")[0] not in quantized}
    for key in getattr(skeleton, "_keys_to_ignore_on_save", None) or []:
        floats.pop(key, None)
    floats = remove_tied_weights_from_state_dict(floats, skeleton)
    counts["total_parameters"] = sum(
        p.numel() for n, p in skeleton.named_parameters() if n.rpartition(".")[0] not in quantized
    )
    units: list[ShardUnit] = []
    done: set[str] = set()
    for key in state:
        owner = key.rpartition(".")[0]
        if owner in quantized:
            if owner not in done:
                done.add(owner)
                q = quantized[owner]
                units.append(quantized_unit(owner, q, ct_schemes[q.scheme], dtype, counts))
        elif key in floats:
            units.append(float_unit(key, floats[key]))
    return units


def save_streaming(
    model: nn.Module,
    out: Path,
    quantized: dict[str, QuantizedLinear],
    ct_schemes: dict[LinearQuantScheme, Any],
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> Any:
    """Write `model`'s checkpoint, config and generation config into `out`; return the qconfig.

    Exact: the same tensors (names, dtypes, values) and config.json as `save_pretrained` on a
    model copy whose quantized linears are compressed, without that copy: float tensors are read
    from `model`, one quantized linear is compressed at a time and released once written.
    """
    from compressed_tensors.compressors import ModelCompressor

    skeleton = model_copy(model, quantized, lambda q: placeholder(q, ct_schemes[q.scheme], dtype))
    compressor = ModelCompressor.from_pretrained_model(skeleton)
    counts: dict[str, int] = {}
    units = _units(skeleton, quantized, ct_schemes, dtype, counts)
    shards = write_sharded_checkpoint(
        out, units, max_shard_bytes=max_shard_bytes, index_metadata=counts
    )
    log.info("wrote %d tensor groups in %d shard(s)", len(units), len(shards))
    write_configs(model, skeleton, compressor, out)
    return compressor.quantization_config


def write_configs(model: nn.Module, skeleton: nn.Module, compressor: Any, out: Path) -> None:
    """config.json (with the compressor's quantization_config) and generation_config.json,
    from the skeleton's config copy, edited as `save_pretrained` edits it."""
    config = skeleton.config
    config.dtype = str(skeleton.dtype).split(".")[1]
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.save_pretrained(out)
    generation_config(skeleton).save_pretrained(out)
    compressor.update_config(str(out))
