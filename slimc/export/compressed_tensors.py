"""Save a slimc-quantized Hugging Face model as a compressed-tensors checkpoint directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimc.errors import UserError, first_line
from slimc.export import ct_experts, ct_stream
from slimc.export.ct_layers import compressed_linear, generation_config, model_copy
from slimc.export.shards import DEFAULT_MAX_SHARD_BYTES
from slimc.nn import (
    HadamardInputRotation,
    HadamardRotation,
    OutputBias,
    QuantizedExperts,
    QuantizedLinear,
)
from slimc.quant.scheme import LinearQuantScheme, TensorQuantSpec

__all__ = ["quantization_scheme", "save_compressed_tensors"]

log = logging.getLogger(__name__)

# The compressed-tensors library and transformers are imported inside the functions that use
# them: together they take seconds to import, and only saving in this format needs them.

PT2_HINT = "use format='pt2' (--format pt2) instead"


def _args(spec: TensorQuantSpec) -> Any:
    """compressed-tensors `QuantizationArgs` for one slimc tensor spec."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=spec.bits,
        type="int",
        symmetric=spec.symmetric,
        strategy=spec.granularity,
        group_size=spec.group_size if spec.granularity == "group" else None,
        dynamic=spec.dynamic,
    )


def quantization_scheme(scheme: LinearQuantScheme, targets: list[str]) -> Any:
    """The compressed-tensors `QuantizationScheme` equivalent to a slimc linear scheme.

    The compression format is the one compressed-tensors itself infers for an `nn.Linear`:
    `int-quantized` when activations are quantized (int8 storage, also for int4 weights, which is
    what vLLM's W4A8 int scheme reads), `pack-quantized` for weight-only schemes (int32 words).
    `save_compressed_tensors` may change it (see `_loadable_formats`).

    Raises:
        UserError: compressed-tensors cannot express the scheme.
    """
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    try:
        ct = QuantizationScheme(
            targets=targets,
            weights=_args(scheme.weight),
            input_activations=None if scheme.activation is None else _args(scheme.activation),
        )
        ct.format = infer_module_format(nn.Linear, ct)
    except (ValueError, NotImplementedError, StopIteration) as exc:
        reason = first_line(exc)
        raise UserError(
            f"scheme {scheme.name!r} cannot be expressed in compressed-tensors ({reason}); "
            f"{PT2_HINT}"
        ) from exc
    return ct


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _group_schemes(quantized: dict[str, QuantizedLinear]) -> dict[LinearQuantScheme, list[str]]:
    groups: dict[LinearQuantScheme, list[str]] = {}
    for name, q in quantized.items():
        groups.setdefault(q.scheme, []).append(name)
    return groups


def has_quantized_experts(model: Any) -> bool:
    """Whether `model` holds MoE experts that slimc quantized (`QuantizedExperts`)."""
    modules = model.modules() if isinstance(model, nn.Module) else ()
    return any(isinstance(m, QuantizedExperts) for m in modules)


def check_expressible(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The model's quantized linears, if compressed-tensors can hold the model.

    Raises:
        UserError: not a Hugging Face model, run-time pieces a plain HF model cannot load
            (norm output biases, online rotations), quantized layers that were not Linear
            modules (GPT-2's Conv1D), quantized experts whose checkpoint keeps them fused,
            no quantized layers, or a scheme that compressed-tensors cannot express; the
            message names the reason and points to pt2.
    """
    return _expressible(model)[0]


def _expressible(
    model: nn.Module,
) -> tuple[dict[str, QuantizedLinear], ct_experts.ExpertLayout | None]:
    """`check_expressible`, plus the per-expert layout of quantized MoE experts (None when the
    model has none), which that check has to compute anyway."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise UserError(
            "the compressed-tensors format needs a Hugging Face model, got "
            f"{type(model).__name__}; {PT2_HINT}"
        )
    biased = [n for n, m in model.named_modules() if isinstance(m, OutputBias)]
    if biased:
        raise UserError(
            f"asymmetric smoothing added a bias after {biased[0]} (and {len(biased) - 1} more), "
            f"which a Hugging Face model of this class cannot load; {PT2_HINT}"
        )
    rotated = [
        ("input" if isinstance(m, HadamardInputRotation) else "output", n)
        for n, m in model.named_modules()
        if isinstance(m, (HadamardRotation, HadamardInputRotation))
    ]
    if rotated:
        what, name = rotated[0]
        raise UserError(
            f"quarot rotates the {what} of {name} (and {len(rotated) - 1} more) at run "
            f"time, which a Hugging Face model of this class cannot load; {PT2_HINT}"
        )
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    not_linear = [(n, q.replaced_type) for n, q in quantized.items() if q.replaced_type]
    if not_linear:
        name, kind = not_linear[0]
        more = f" (and {len(not_linear) - 1} more)" if len(not_linear) > 1 else ""
        raise UserError(
            f"compressed-tensors quantizes Linear modules, and {name}{more} is a {kind}, whose "
            f"weight a Hugging Face model of this class holds transposed; {PT2_HINT}"
        )
    if not quantized:
        raise UserError(
            "the model has no quantized linear layers (compile it with slimc.compile first)"
        )
    for scheme in _group_schemes(quantized):
        quantization_scheme(scheme, ["Linear"])
    experts, plain = ct_experts.split_experts(model, quantized)
    if not experts:
        return quantized, None
    # one linear per expert on disk, where the checkpoint format has them
    return quantized, ct_experts.expert_layout(model, plain)


def save_compressed_tensors(
    model: nn.Module,
    out: Path,
    tokenizer: Any = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """Write `model` (with `QuantizedLinear` layers) as a compressed-tensors HF directory in `out`.

    `out` must be an existing empty directory (the caller makes the write atomic). Weights are
    compressed by compressed-tensors' own compressors (`ModelCompressor` builds the
    `quantization_config`); float linears go to its `ignore` list. The checkpoint is streamed:
    float tensors are read straight from `model` and each quantized linear is compressed when
    its turn comes and released once written, in safetensors shards of at most
    `max_shard_bytes` (index last). Quantized MoE experts are written one linear per expert
    under the names of the original checkpoint (`ct_experts`). Other models whose names on disk
    differ from their module names (transformers' weight conversions) are saved through a full
    model copy.

    Returns:
        The `quantization_config` written to config.json.

    Raises:
        UserError: not a Hugging Face model, no quantized layers, a scheme compressed-tensors
            cannot express, or a full disk.
    """
    quantized, layout = _expressible(model)
    groups = _group_schemes(quantized)
    single = len(groups) == 1
    ct_schemes = {
        s: quantization_scheme(s, ["Linear"] if single else names) for s, names in groups.items()
    }
    if layout is None:  # transformers cannot load experts anyway: keep the formats vLLM wants
        _loadable_formats(list(ct_schemes.values()))
    dtype = _float_dtype(model)
    if dtype != torch.float32:
        log.warning(
            "model dtype is %s: scales are stored in %s (rounded from float32)", dtype, dtype
        )
    blocker = ct_stream.streaming_blocker(model)
    if layout is not None:
        log.warning(
            "quantized MoE experts are written one linear per expert, the layout vLLM reads; "
            "transformers cannot load such a checkpoint back (use pt2 for slimc.load)"
        )
        qconfig = ct_experts.save_with_experts(
            model, out, layout, ct_schemes, dtype, max_shard_bytes
        )
    elif blocker is None:
        qconfig = ct_stream.save_streaming(
            model, out, quantized, ct_schemes, dtype, max_shard_bytes
        )
    else:
        log.info("saving through a full model copy: %s", blocker)
        qconfig = _save_from_model_copy(model, out, quantized, ct_schemes, dtype)
    quant_cfg = _finish_config(out, qconfig, for_transformers=layout is None)
    save_tokenizer(model, tokenizer, out)
    log.info(
        "compressed-tensors: %d quantized linears, format %s, ignore %s",
        len(quantized),
        quant_cfg.get("format"),
        quant_cfg.get("ignore"),
    )
    return quant_cfg


def _save_from_model_copy(
    model: nn.Module,
    out: Path,
    quantized: dict[str, QuantizedLinear],
    ct_schemes: dict[LinearQuantScheme, Any],
    dtype: torch.dtype,
    max_shard_size: int | str = "50GB",
) -> Any:
    """Compress every quantized linear into a model copy and `save_pretrained` it (all in memory)."""
    from compressed_tensors.compressors import ModelCompressor

    work = model_copy(model, quantized, lambda q: compressed_linear(q, ct_schemes[q.scheme], dtype))
    compressor = ModelCompressor.from_pretrained_model(work)
    work.save_pretrained(out, max_shard_size=max_shard_size)
    if not (out / "generation_config.json").exists():
        generation_config(work).save_pretrained(out)
    compressor.update_config(str(out))
    return compressor.quantization_config


def _is_asym_packed(ct_scheme: Any) -> bool:
    fmt = str(getattr(ct_scheme.format, "value", ct_scheme.format))
    weights = ct_scheme.weights
    return fmt == "pack-quantized" and weights is not None and not weights.symmetric


def _loadable_formats(ct_schemes: list[Any]) -> None:
    """Pick formats transformers can load when asymmetric packed weights meet mixed schemes.

    transformers (5.x, compressed-tensors 0.20) loads asymmetric `pack-quantized` weights only
    through its `dequantize` path (see `_finish_config`), and that path decompresses every dense
    layer with one config group's scheme. With several groups, asymmetric weight-only groups are
    therefore stored as `naive-quantized` (integers unpacked in int8, zero points in int8), which
    transformers loads in compressed mode; vLLM's int4/int8 weight-only kernels want
    `pack-quantized`, hence the warning.
    """
    if len(ct_schemes) < 2 or not any(_is_asym_packed(c) for c in ct_schemes):
        return
    from compressed_tensors.config import CompressionFormat

    for ct in ct_schemes:
        if _is_asym_packed(ct):
            ct.format = CompressionFormat.naive_quantized
    log.warning(
        "mixed quantization schemes with asymmetric weights: those layers are saved as "
        "naive-quantized (unpacked int8) so that transformers can load the checkpoint; "
        "engines such as vLLM expect pack-quantized for them"
    )


def _finish_config(out: Path, qconfig: Any, *, for_transformers: bool) -> dict[str, Any]:
    """Post-process config.json's quantization_config; return it.

    transformers 5 with compressed-tensors 0.20 cannot load an asymmetric `pack-quantized`
    checkpoint in compressed mode: on the meta device the compressor does not pack the zero
    point, so the checkpoint's packed `weight_zero_point` no longer matches the parameter
    (vllm-project/llm-compressor#1618). Such checkpoints get `"dequantize": true`, which makes
    transformers decompress them with the library's own decompressor while loading (exact for
    weight-only schemes); engines that run compressed-tensors natively (vLLM) ignore the key.
    """
    path = out / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    qc = data["quantization_config"]
    asym_packed = [g for g in qconfig.config_groups.values() if _is_asym_packed(g)]
    if asym_packed and for_transformers:
        if len(qconfig.config_groups) > 1 or any(
            g.input_activations is not None for g in asym_packed
        ):
            raise UserError(  # not produced by slimc's schemes; guards the dequantize trick
                "asymmetric packed weights with quantized activations or mixed schemes cannot be "
                f"loaded by transformers from compressed-tensors; {PT2_HINT}"
            )
        qc["dequantize"] = True
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return qc


def save_tokenizer(model: nn.Module, tokenizer: Any, out: Path) -> None:
    """Save `tokenizer`, or the one next to the model's local checkpoint when none is given."""
    if tokenizer is None:
        source = str(getattr(model, "name_or_path", "") or "")
        if source and Path(source).is_dir():
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except Exception:  # noqa: BLE001 - no usable tokenizer there
                tokenizer = None
    if tokenizer is None:
        log.warning(
            "no tokenizer given and none next to the model: the output has no tokenizer files"
        )
        return
    tokenizer.save_pretrained(out)
