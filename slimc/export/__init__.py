"""Save compiled models (compressed-tensors, AscendV1, torch.export .pt2) and load them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from slimc.errors import UserError, first_line
from slimc.export import ascend_v1, compressed_tensors, ct_experts, pt2
from slimc.export.atomic import atomic_directory, check_target

__all__ = [
    "FORMATS",
    "auto_format",
    "check_transformers_loadable",
    "load",
    "resolve_format",
    "save",
]

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "ascend-v1", "pt2", "auto")


def auto_format(model: Any) -> tuple[str, str | None]:
    """The format ``auto`` picks for `model`, and why it is pt2 (None for compressed-tensors):
    compressed-tensors when it can hold the model and transformers can load it back."""
    if compressed_tensors.has_quantized_experts(model):
        return "pt2", (
            "transformers cannot load compressed-tensors checkpoints of quantized MoE experts "
            "(vLLM reads them: format compressed-tensors writes one)"
        )
    try:
        compressed_tensors.check_expressible(model)
    except UserError as exc:
        return "pt2", str(exc).split(";")[0]
    return "compressed-tensors", None


def resolve_format(model: Any, format: str) -> str:  # noqa: A002 - the user-facing option name
    """``auto``: `auto_format` (the reason for pt2 is logged); any other format as given."""
    if format != "auto":
        return format
    chosen, reason = auto_format(model)
    if reason is not None:
        log.info("saving as pt2: %s", reason)
    return chosen


def save(
    model: Any,
    path: str | os.PathLike[str],
    format: str = "compressed-tensors",  # noqa: A002 - the user-facing option name
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a compiled model as a complete output directory, atomically.

    Formats:
        ``compressed-tensors``: a Hugging Face model directory (config.json with
        ``quantization_config``, safetensors weights, generation_config.json, tokenizer files)
        that ``AutoModelForCausalLM.from_pretrained`` loads (with the ``compressed-tensors``
        package) and vLLM serves. ``model`` is the result of ``slimc.compile`` on an HF model.
        ``pt2``: ``DIR/model.pt2``, the compiled program (``model.slimc_program``, or a
        ``slimc.Program``) exported with ``torch.export`` (dynamic batch / sequence dims;
        calls ``slimc::`` custom ops), plus the config and tokenizer files.
        ``ascend-v1``: msModelSlim's AscendV1 directory for MindIE / vLLM-Ascend
        (``quant_model_weights.safetensors`` + ``quant_model_description.json`` with one mode
        tag per tensor, plus config and tokenizer files); see ``slimc.export.ascend_v1``.

    The directory is written under a temporary name next to `path` and renamed at the end: a
    failed save leaves nothing at `path`. A missing or empty directory is written; a non-empty
    one only with ``overwrite=True`` (it is replaced only once the new one is complete).

    Args:
        model: the model returned by ``slimc.compile`` (or a Program, for ``pt2``).
        path: the output directory.
        format: ``"compressed-tensors"``, ``"ascend-v1"``, ``"pt2"`` or ``"auto"``.
            ``"auto"``: compressed-tensors when it can hold the model, else pt2 (a model with
            run-time rotations, norm biases or quantized GPT-2 ``Conv1D`` layers).
        tokenizer: a tokenizer to save alongside (compressed-tensors falls back to the one in
            the model's local source directory).
        overwrite: replace an existing non-empty directory.

    Returns:
        The output directory (absolute).

    Raises:
        UserError: unknown format, unwritable or occupied path, a model/scheme the format
            cannot hold.
    """
    if format not in FORMATS:
        raise UserError(f"unknown save format {format!r}; expected one of {', '.join(FORMATS)}")
    target = check_target(path, overwrite=overwrite, protected=_source_directories(model))
    format = resolve_format(model, format)  # noqa: A001
    with atomic_directory(target, overwrite=overwrite) as tmp:
        if format == "pt2":
            pt2.save_pt2(model, tmp, tokenizer)
        elif format == "ascend-v1":
            ascend_v1.save_ascend_v1(model, tmp, tokenizer)
        else:
            compressed_tensors.save_compressed_tensors(model, tmp, tokenizer)
    log.info("saved %s model to %s", format, target)
    return target


def _source_directories(model: Any) -> list[Path]:
    """The local directory the model was loaded from (never overwritten by a save), if any."""
    source = str(getattr(model, "name_or_path", "") or "")
    config = getattr(model, "config", None)
    source = source or str(getattr(config, "_name_or_path", "") or "")
    return [Path(source)] if source and Path(source).is_dir() else []


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"pt2"``, ``"compressed-tensors"`` or ``"hf"`` for a saved output path.

    Raises:
        UserError: the path does not exist or holds neither format.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".pt2":
        return "pt2"
    if not p.is_dir():
        why = "is not a directory or .pt2 file" if p.exists() else "does not exist"
        raise UserError(f"{p} {why}")
    if (p / pt2.PT2_NAME).is_file():
        return "pt2"
    config = p / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {config}: {exc}") from exc
        qc = data.get("quantization_config") or {}
        return "compressed-tensors" if qc.get("quant_method") == "compressed-tensors" else "hf"
    raise UserError(f"{p} holds neither {pt2.PT2_NAME} nor a Hugging Face config.json")


def check_transformers_loadable(directory: Path) -> None:
    """UserError for a checkpoint slimc writes that transformers cannot load (quantized MoE
    experts one linear per expert), before transformers fails with a conversion report."""
    if ct_experts.has_per_expert_quantized(directory):
        raise UserError(
            f"cannot load {directory}: it holds quantized MoE experts one linear per expert "
            "(the layout vLLM reads), which transformers cannot load; serve it with vLLM, or "
            "save with --format pt2 to run it with slimc"
        )


def load(path: str | os.PathLike[str]) -> Any:
    """Load a directory written by `save` and return something runnable.

    compressed-tensors (or any HF) directory: the transformers model from
    ``AutoModelForCausalLM.from_pretrained`` in eval mode. pt2 directory or ``.pt2`` file: the
    unlifted module ``ep.module()`` (``slimc.ops`` is imported first so the custom ops exist),
    mapping input ids to logits for causal LMs.

    Raises:
        UserError: the path is missing or holds no loadable model.
    """
    fmt = detect_format(path)
    p = Path(path).expanduser()
    if fmt == "pt2":
        return pt2.load_pt2(p)
    check_transformers_loadable(p)
    # transformers takes seconds to import: loaded on first use
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(p)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad input here
        raise UserError(f"cannot load {p}: {first_line(exc, with_type=True)}") from exc
    return model.eval()
