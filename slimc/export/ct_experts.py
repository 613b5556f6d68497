"""Stream a model with quantized MoE experts into compressed-tensors, one linear per expert.

transformers 5 holds the experts of a MoE block as stacks (`experts.gate_up_proj` [E, 2I, H])
and converts the per-expert tensors of the checkpoint (`experts.<e>.gate_proj.weight`) into them
while loading. vLLM and the original checkpoints keep one linear per expert, so that is what is
written: each quantized stack is cut into per-expert, per-projection `QuantizedLinear`s named as
the checkpoint names them. The names come from transformers' own reversal of its conversions
(`revert_weight_conversion`, what `save_pretrained` uses), fed with tensors of row numbers in
place of the quantized weights: where a row lands on disk says which linear it belongs to. Row
cuts and permutations are exact; a conversion that moves columns cannot be followed and is
refused.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimc.errors import UserError
from slimc.export.ct_layers import model_copy
from slimc.export.shards import write_sharded_checkpoint
from slimc.nn import QuantizedExperts, QuantizedLinear
from slimc.quant.scheme import LinearQuantScheme

__all__ = [
    "ExpertLayout",
    "expert_layout",
    "has_per_expert_quantized",
    "save_with_experts",
    "split_experts",
]

log = logging.getLogger(__name__)

_ROW_BASE = 1 << 40  # row numbers start here: no float weight and no real buffer is int64 there


@dataclass
class ExpertLayout:
    """The checkpoint as written: quantized linears by on-disk name, float tensors by key."""

    linears: dict[str, QuantizedLinear]
    floats: dict[str, torch.Tensor]
    ignore: list[str]
    skeleton: nn.Module  # the model with float experts modules, sharing its tensors


@dataclass
class _Stack:
    """The per-expert linears of one quantized stack (one block of row numbers)."""

    path: str
    linears: list[QuantizedLinear]

    @property
    def rows(self) -> int:
        return self.linears[0].out_features


_Owner = tuple[int, "QuantizedLinear | _Stack", int]  # first row number, owner, row count


def _row_numbers(
    owners: list[_Owner], owner: QuantizedLinear | _Stack, shape: tuple[int, ...]
) -> torch.Tensor:
    """Fresh row numbers of `shape` (+ a trailing 1 for the columns), recorded as `owner`'s."""
    start = owners[-1][0] + owners[-1][2] if owners else _ROW_BASE
    count = math.prod(shape)
    owners.append((start, owner, count))
    return torch.arange(start, start + count).reshape(*shape, 1)


def _rows_of(q: QuantizedLinear, rows: torch.Tensor) -> QuantizedLinear:
    """The linear made of output rows `rows` of q (exact: every tensor but the input range is
    per row)."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, rows)

    return QuantizedLinear(
        q.scheme,
        q.in_features,
        rows.numel(),
        pick(q.qweight),  # type: ignore[arg-type]
        pick(q.weight_scale),  # type: ignore[arg-type]
        pick(q.weight_zero_point),
        pick(q.bias),
        q.input_scale,
        q.input_zero_point,
    )


def split_experts(
    model: nn.Module, quantized: dict[str, QuantizedLinear]
) -> tuple[list[str], dict[str, QuantizedLinear]]:
    """The model's `QuantizedExperts` modules, and the quantized linears outside them (the
    per-expert linears inside are written from their stacks)."""
    experts = [n for n, m in model.named_modules() if isinstance(m, QuantizedExperts)]
    inside = tuple(f"{n}." for n in experts)
    return experts, {n: q for n, q in quantized.items() if not n.startswith(inside)}


def _skeleton(model: nn.Module, quantized: dict[str, QuantizedLinear]) -> nn.Module:
    """A copy of `model` sharing its tensors, each QuantizedExperts replaced by the float experts
    module it wraps (its quantized stacks removed) and each quantized linear by a weightless one."""
    memo_extra = {id(m): m.module for m in model.modules() if isinstance(m, QuantizedExperts)}

    def placeholder(q: QuantizedLinear) -> nn.Module:
        return nn.Linear(q.in_features, q.out_features, bias=False, device="meta")

    return model_copy(model, quantized, placeholder, extra_memo=memo_extra)


def expert_layout(model: nn.Module, quantized: dict[str, QuantizedLinear]) -> ExpertLayout:
    """Where each quantized linear (`quantized`: those outside the experts) and each expert of
    `model` goes in a checkpoint with the names and layout transformers loads (its conversions
    reversed).

    Raises:
        UserError: the model's checkpoint format keeps experts fused (no per-expert linear to
            write), or a conversion moves a quantized weight's columns.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    skeleton = _skeleton(model, quantized)
    state = {
        k: v for k, v in skeleton.state_dict().items() if k.rpartition(".")[0] not in quantized
    }
    for key in getattr(skeleton, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, skeleton)
    owners: list[_Owner] = []
    for name, q in quantized.items():
        state[f"{name}.weight"] = _row_numbers(owners, q, (q.out_features,))
    for path, experts in _quantized_experts(model):
        for stack, linears in experts.quantized.items():
            marker = _Stack(path, list(linears))  # type: ignore[arg-type]
            state[f"{path}.{stack}"] = _row_numbers(owners, marker, (len(linears), marker.rows))
    reverted = revert_weight_conversion(skeleton, state)
    starts = [start for start, _, _ in owners]
    embeddings = _embedding_tensors(model)
    linears: dict[str, QuantizedLinear] = {}
    floats: dict[str, torch.Tensor] = {}
    ignore: list[str] = []
    for key, value in reverted.items():
        if value.dtype == torch.int64 and value.numel() and int(value.min()) >= _ROW_BASE:
            name = _linear_name(key, value)
            linears[name] = _linear_of(key, value, owners, starts)
            continue
        floats[key] = value
        if key.endswith(".weight") and value.dim() == 2 and value.data_ptr() not in embeddings:
            ignore.append(key.removesuffix(".weight"))
    return ExpertLayout(linears, floats, ignore, skeleton)


def _quantized_experts(model: nn.Module) -> Iterable[tuple[str, QuantizedExperts]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            if module.module.is_transposed:
                raise UserError(
                    f"the experts of {name} are stored transposed ([E, in, out]); their "
                    "compressed-tensors layout is not written by slimc; use format='pt2' "
                    "(--format pt2) instead"
                )
            yield name, module


def _embedding_tensors(model: nn.Module) -> set[int]:
    return {
        m.weight.data_ptr()
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.weight.device.type != "meta"
    }


def _linear_name(key: str, value: torch.Tensor) -> str:
    if not key.endswith(".weight") or value.dim() != 2 or value.shape[1] != 1:
        raise UserError(
            f"this model's checkpoints keep {key} as one tensor for all experts, and "
            "compressed-tensors quantizes one linear per expert; use format='pt2' "
            "(--format pt2) instead"
        )
    return key.removesuffix(".weight")


def _linear_of(
    key: str, value: torch.Tensor, owners: list[_Owner], starts: list[int]
) -> QuantizedLinear:
    """The quantized linear whose rows the row numbers `value` [n, 1] name (`starts`: each
    owner's first row number, ascending)."""
    ids = value.reshape(-1)
    start, owner, _ = owners[bisect.bisect_right(starts, int(ids[0])) - 1]
    local = ids - start
    if isinstance(owner, _Stack):
        expert = local // owner.rows
        if not bool((expert == expert[0]).all()):
            raise UserError(f"{key} mixes the rows of several experts of {owner.path}")
        return _rows_of(owner.linears[int(expert[0])], local % owner.rows)
    assert isinstance(owner, QuantizedLinear)
    if int(local.max()) >= owner.out_features:
        raise UserError(f"{key} mixes the rows of several quantized linears")
    if torch.equal(local, torch.arange(owner.out_features)):
        return owner
    return _rows_of(owner, local)


def _config_tree(
    layout: ExpertLayout, ct_schemes: dict[LinearQuantScheme, Any], dtype: torch.dtype
) -> nn.Module:
    """Weightless placeholders at the checkpoint's linear names, each carrying its scheme (with
    those names as targets when schemes are mixed): what compressed-tensors reads to build the
    quantization_config."""
    from slimc.export.ct_stream import placeholder

    mixed = len(ct_schemes) > 1
    targets: dict[LinearQuantScheme, list[str]] = {}
    for name, q in layout.linears.items():
        targets.setdefault(q.scheme, []).append(name)
    root = nn.Module()
    for name, q in layout.linears.items():
        ct = ct_schemes[q.scheme]
        if mixed:
            ct = ct.model_copy(update={"targets": targets[q.scheme]})
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]  # type: ignore[assignment]
        parent.add_module(leaf, placeholder(q, ct, dtype))
    return root


def save_with_experts(
    model: nn.Module,
    out: Path,
    layout: ExpertLayout,
    ct_schemes: dict[LinearQuantScheme, Any],
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> Any:
    """Write `model`'s checkpoint as `layout` (`expert_layout`: one linear per expert) and its
    configs into `out`; return the qconfig. Each linear is compressed when its turn comes and
    released once written; the float linears (routers, lm_head) are listed in `ignore` by their
    names on disk."""
    from compressed_tensors.compressors import ModelCompressor

    from slimc.export.ct_stream import float_unit, quantized_unit, write_configs

    compressor = ModelCompressor.from_pretrained_model(_config_tree(layout, ct_schemes, dtype))
    qconfig = compressor.quantization_config
    qconfig.ignore = sorted(layout.ignore)
    counts = {"total_parameters": sum(v.numel() for v in layout.floats.values())}
    units = [float_unit(k, v) for k, v in layout.floats.items()]
    units += [
        quantized_unit(name, q, ct_schemes[q.scheme], dtype, counts)
        for name, q in layout.linears.items()
    ]
    shards = write_sharded_checkpoint(
        out, units, max_shard_bytes=max_shard_bytes, index_metadata=counts
    )
    log.info(
        "wrote %d quantized linears (one per expert and projection) in %d shard(s)",
        len(layout.linears),
        len(shards),
    )
    write_configs(model, layout.skeleton, compressor, out)
    return qconfig


_PER_EXPERT_QUANTIZED = re.compile(r"\.experts\.\d+\.[^.]+\.weight_scale$")


def has_per_expert_quantized(directory: Path) -> bool:
    """Whether the safetensors checkpoint in `directory` holds quantized linears of single
    experts (`...experts.<e>.<proj>.weight_scale`): the layout `save_with_experts` writes."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names: list[str] = list(json.loads(index.read_text()).get("weight_map", {}))
    else:
        names = []
        for shard in sorted(directory.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                names.extend(f.keys())
    return any(_PER_EXPERT_QUANTIZED.search(name) for name in names)
