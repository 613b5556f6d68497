"""Save a slimc-quantized model in msModelSlim's AscendV1 format (MindIE, vLLM-Ascend) and read it back.

Output directory: `quant_model_weights.safetensors` (every tensor), `quant_model_description.json`
(global keys, then one `"<tensor name>": "<MODE>"` entry per tensor), `config.json` (without
`quantization_config`), `generation_config.json` and tokenizer files when the model has them.

Per quantized linear `L` (weights [N, K]; int4 packed two per int8 along K, low nibble = even k,
two's-complement nibbles; `weight_offset` is the zero point: w = (q - offset) * scale):

| mode          | slimc scheme  | tensors                                                      |
|---------------|---------------|--------------------------------------------------------------|
| W8A8          | w8a8          | weight i8, input_scale/input_offset f32 [1], deq_scale [N]   |
|               |               | (f32 for bf16 models, else the f32 bits as i64), quant_bias  |
|               |               | i32 [N], weight_scale/weight_offset f32 [N, 1], bias         |
| W8A8_DYNAMIC  | w8a8-dynamic  | weight i8, weight_scale/weight_offset f32 [N, G], bias       |
| W8A16         | w8a16         | weight i8, weight_scale/weight_offset f32 [N, G], bias       |
| W4A16         | w4a16         | weight packed i8 [N, K/2], weight_scale/weight_offset [N, G] |
| W4A8_DYNAMIC  | w4a8          | weight packed, weight_scale, weight_offset (0), scale_bias   |
|               |               | f32 [N, 1] (= 8 * row sum of the dequantized weight; [N, 16] |
|               |               | chunk sums for row-parallel down_proj/o_proj/w2), bias       |
| W4A4_DYNAMIC  | w4a4          | weight packed, weight_scale, weight_offset                   |

Other float tensors are `FLOAT`. All tensors of one linear share its mode tag.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from slimc.errors import UserError
from slimc.export import ct_experts, ct_stream
from slimc.export.ascend_v1_tensors import (
    PT2_HINT,
    ascend_mode,
    decode_deq_scale,
    encode_deq_scale,
    linear_tensors,
    pack_int4_int8,
    unpack_int4_int8,
)
from slimc.export.compressed_tensors import save_tokenizer
from slimc.export.shards import ShardUnit, disk_full_is_user_error, write_sharded_checkpoint
from slimc.nn import (
    HadamardInputRotation,
    HadamardRotation,
    KernelLinear,
    OutputBias,
    QuantizedLinear,
)

__all__ = [
    "DESCRIPTION_NAME",
    "WEIGHTS_NAME",
    "AscendV1Checkpoint",
    "ascend_mode",
    "decode_deq_scale",
    "encode_deq_scale",
    "load_ascend_v1",
    "pack_int4_int8",
    "save_ascend_v1",
    "unpack_int4_int8",
]

log = logging.getLogger(__name__)

WEIGHTS_NAME = "quant_model_weights.safetensors"
DESCRIPTION_NAME = "quant_model_description.json"
VERSION = "1.0.0"
GLOBAL_KEYS = frozenset(
    {
        "model_quant_type",
        "version",
        "group_size",
        "kv_quant_type",
        "kv_cache_type",
        "fa_quant_type",
        "reduce_quant_type",
        "metadata",
        "optional",
    }
)
"""Description keys that describe the model, not one tensor."""
_MAX_TENSORS_PER_LINEAR = 10
"""Bound on one linear's tensors (W8A8 writes 8: weight, weight_scale, weight_offset,
input_scale, input_offset, deq_scale, quant_bias, bias)."""

MODE_PRIORITY = (
    "FLOAT",
    "W16A16S",
    "W8A16",
    "W4A16",
    "W8A8_DYNAMIC",
    "W8A8_MIX",
    "W8A8",
    "W4A8_DYNAMIC",
    "WFP8AFP8_DYNAMIC",
    "W8A8_MXFP8",
    "W4A8_MXFP",
    "W4A4_DYNAMIC",
    "W4A4_MXFP4",
    "W4A4_MXFP4_DUALSCALE",
)
"""`model_quant_type` is the last of these present (msModelSlim's order, W4A16 / W4A8_DYNAMIC
placed next to their 8-bit counterparts)."""


# --------------------------------------------------------------------------- saving


def _check_model(model: nn.Module) -> dict[str, QuantizedLinear]:
    lowered = [n for n, m in model.named_modules() if isinstance(m, KernelLinear)]
    if lowered:
        raise UserError(
            f"{lowered[0]} (and {len(lowered) - 1} more) is bound to a kernel by a lowering pass; "
            "save the model compiled without lowering (AscendV1 engines do their own lowering)"
        )
    extra = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (OutputBias, HadamardRotation, HadamardInputRotation))
    ]
    if extra:
        raise UserError(
            f"{extra[0]} (and {len(extra) - 1} more) adds run-time work (a norm bias or an online "
            f"rotation) that AscendV1 cannot describe; {PT2_HINT}"
        )
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    not_linear = [(n, q.replaced_type) for n, q in quantized.items() if q.replaced_type]
    if not_linear:
        name, kind = not_linear[0]
        raise UserError(
            f"AscendV1 describes Linear layers, and {name} (and {len(not_linear) - 1} more) is "
            f"a {kind}, whose weight the model's loaders hold transposed; {PT2_HINT}"
        )
    if not quantized:
        raise UserError(
            "the model has no quantized linear layers (compile it with slimc.compile first)"
        )
    return quantized


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _float_tensors(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """The model's state dict outside quantized linears, one name per shared storage.

    The model's own tensors (not copies): the writer reads them as it goes.
    """
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in skip:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            log.info("ascend-v1: %s shares its storage with %s; saved once", key, seen[ident])
            continue
        seen[ident] = key
        out[key] = t.detach()
    return out


def _linear_unit(
    name: str, q: QuantizedLinear, dtype: torch.dtype, modes: dict[str, str]
) -> ShardUnit:
    """One quantized linear, its AscendV1 tensors made when the writer reaches it."""

    def tensors() -> list[tuple[str, torch.Tensor]]:
        mode, parts = linear_tensors(name, q, dtype)
        modes.update((f"{name}.{suffix}", mode) for suffix in parts)
        return [(f"{name}.{suffix}", t) for suffix, t in parts.items()]

    nbytes = sum(t.numel() * t.element_size() for t in (*q.parameters(), *q.buffers()))
    return ShardUnit(nbytes, tensors, [name], max_tensors=_MAX_TENSORS_PER_LINEAR)


def _units(
    model: nn.Module,
    quantized: dict[str, QuantizedLinear],
    dtype: torch.dtype,
    modes: dict[str, str],
) -> list[ShardUnit]:
    """Every tensor in state-dict order: float tensors read from the model as they are, each
    quantized linear converted on demand (its mode tags land in `modes` once it is made)."""
    floats = _float_tensors(model, set(quantized))
    modes.update(dict.fromkeys(floats, "FLOAT"))
    units: list[ShardUnit] = []
    done: set[str] = set()
    for key in model.state_dict():
        owner = key.rpartition(".")[0]
        if owner in quantized:
            if owner not in done:
                done.add(owner)
                units.append(_linear_unit(owner, quantized[owner], dtype, modes))
        elif key in floats:
            tensor = floats[key]
            size = tensor.numel() * tensor.element_size()
            units.append(ShardUnit(size, lambda key=key, t=tensor: [(key, t)], [key]))
    return units


def _expert_units(
    layout: ct_experts.ExpertLayout, dtype: torch.dtype, modes: dict[str, str]
) -> list[ShardUnit]:
    """A model with quantized experts in its original checkpoint's names and layout: one
    linear per expert and projection (`ct_experts.expert_layout`), float tensors as `FLOAT`."""
    modes.update(dict.fromkeys(layout.floats, "FLOAT"))
    units = [ct_stream.float_unit(key, t) for key, t in layout.floats.items()]
    units += [_linear_unit(name, q, dtype, modes) for name, q in layout.linears.items()]
    return units


def _group_size(quantized: dict[str, QuantizedLinear]) -> int:
    sizes = {q.scheme.weight.group_size for q in quantized.values()}
    sizes.discard(-1)
    if len(sizes) > 1:
        raise UserError(
            f"AscendV1 stores one global group_size, the model uses {sorted(sizes)}; {PT2_HINT}"
        )
    return sizes.pop() if sizes else 0


def save_ascend_v1(model: nn.Module, out: Path, tokenizer: Any = None) -> dict[str, Any]:
    """Write `model` (with `QuantizedLinear` layers) as an AscendV1 directory into `out`.

    `out` must be an existing empty directory (the caller makes the write atomic). Streamed:
    float tensors are written from the model's own storage and each quantized linear's tensors
    are made when the writer reaches it and dropped once written, so saving holds about one
    linear beyond the model.

    Returns:
        The description written to `quant_model_description.json`.

    Quantized MoE experts are written one linear per expert and projection, under the names of
    the original checkpoint (as `--format compressed-tensors` writes them).

    Raises:
        UserError: no quantized layers, lowered or run-time-rotated layers, mixed group sizes,
            a scheme AscendV1 has no mode for, experts whose checkpoints keep them fused, or a
            full disk.
    """
    quantized = _check_model(model)
    dtype = _model_dtype(model)
    group_size = _group_size(quantized)
    for q in quantized.values():
        ascend_mode(q.scheme)  # a scheme without a mode is refused before anything is written
    modes: dict[str, str] = {}
    experts, plain = ct_experts.split_experts(model, quantized)
    if experts:  # one linear per expert, named as the original checkpoint names it
        layout = ct_experts.expert_layout(model, plain)
        quantized = layout.linears
        units = _expert_units(layout, dtype, modes)
    else:
        units = _units(model, quantized, dtype, modes)
    write_sharded_checkpoint(out, units, single_file=WEIGHTS_NAME)
    present = set(modes.values())
    description: dict[str, Any] = {
        "model_quant_type": max(present, key=MODE_PRIORITY.index),
        "version": VERSION,
        "group_size": group_size,
        "metadata": {"producer": "slimc"},
    }
    description.update(sorted(modes.items()))
    with disk_full_is_user_error(out / DESCRIPTION_NAME):
        (out / DESCRIPTION_NAME).write_text(
            json.dumps(description, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    with disk_full_is_user_error(out / "config.json"):
        _save_config(model, out, quantized)
    with disk_full_is_user_error(out):  # tokenizer files
        _save_tokenizer_files(model, tokenizer, out)
    counts = {m: sum(1 for q in quantized if modes[f"{q}.weight"] == m) for m in present}
    log.info("ascend-v1: %d tensors, linears per mode %s", len(modes), counts)
    return description


def _save_config(model: nn.Module, out: Path, quantized: dict[str, QuantizedLinear]) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return
    config.save_pretrained(out)
    path = out / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("quantization_config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if data.get("tie_word_embeddings") and any(q is head for q in quantized.values()):
        data["tie_word_embeddings"] = False  # a quantized head cannot share the float embedding
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)


def _save_tokenizer_files(model: nn.Module, tokenizer: Any, out: Path) -> None:
    if tokenizer is None and getattr(model, "config", None) is None:
        return  # not a Hugging Face model: no tokenizer to look for
    save_tokenizer(model, tokenizer, out)


# --------------------------------------------------------------------------- reading


@dataclass
class AscendV1Checkpoint:
    """An AscendV1 directory read back: description, tensors and the dequantized weights."""

    description: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    modes: dict[str, str] = field(default_factory=dict)

    def linears(self) -> dict[str, str]:
        """Quantized linear name -> mode."""
        return {
            k.removesuffix(".weight"): m
            for k, m in self.modes.items()
            if m != "FLOAT" and k.endswith(".weight")
        }

    def int_weight(self, name: str) -> torch.Tensor:
        """The integer weight int8 [N, K] of linear `name` (int4 modes unpacked)."""
        w = self.tensors[f"{name}.weight"]
        return unpack_int4_int8(w) if self.modes[f"{name}.weight"].startswith("W4") else w

    def dequantized_weight(self, name: str) -> torch.Tensor:
        """(q - weight_offset) * weight_scale as float32 [N, K], per channel or per group."""
        q = self.int_weight(name).to(torch.float32)
        n, k = q.shape
        scale = self.tensors[f"{name}.weight_scale"].to(torch.float32).reshape(n, -1)
        offset = self.tensors[f"{name}.weight_offset"].to(torch.float32).reshape(n, -1)
        g = scale.shape[1]
        q = q.reshape(n, g, k // g) - offset.unsqueeze(-1)
        return (q * scale.unsqueeze(-1)).reshape(n, k)

    def deq_scale(self, name: str) -> torch.Tensor:
        """A W8A8 linear's deq_scale as float32 [N]."""
        return decode_deq_scale(self.tensors[f"{name}.deq_scale"])


def load_ascend_v1(path: str | Path) -> AscendV1Checkpoint:
    """Read an AscendV1 directory and check that description keys and tensors match one to one.

    Raises:
        UserError: missing files, or a description key without a tensor (or the reverse).
    """
    root = Path(path)
    desc_path, weights_path = root / DESCRIPTION_NAME, root / WEIGHTS_NAME
    for p in (desc_path, weights_path):
        if not p.is_file():
            raise UserError(f"{root} is not an AscendV1 directory: {p.name} is missing")
    description = json.loads(desc_path.read_text(encoding="utf-8"))
    tensors = load_file(str(weights_path))
    modes = {k: v for k, v in description.items() if k not in GLOBAL_KEYS}
    missing = sorted(set(modes) - set(tensors))
    extra = sorted(set(tensors) - set(modes))
    if missing or extra:
        what = f"no tensor for {missing[0]!r}" if missing else f"no description of {extra[0]!r}"
        raise UserError(f"{root}: {what} ({len(missing)} + {len(extra)} mismatches)")
    config_path = root / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    return AscendV1Checkpoint(description, tensors, config, modes)
