"""Checks on a model directory before loading it: config, tokenizer files, existing quantization."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slimc.errors import UserError

__all__ = ["TOKENIZER_FILES", "check_float_checkpoint", "check_model_directory", "load_tokenizer"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "tekken.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files one of which a directory needs for ``AutoTokenizer.from_pretrained`` to load from it."""


def one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line (all of its lines joined)."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def check_model_directory(path: str | os.PathLike[str]) -> Path:
    """`path` made user-relative, checked to be a directory with a ``config.json``.

    Raises:
        UserError: the path is missing, not a directory, or has no ``config.json``.
    """
    d = Path(path).expanduser()
    if not d.exists():
        raise UserError(f"model directory {d} does not exist")
    if not d.is_dir():
        raise UserError(f"model path {d} is not a directory (expected an HF checkpoint dir)")
    if not (d / "config.json").is_file():
        raise UserError(f"model directory {d} has no config.json (not an HF checkpoint)")
    return d


def load_tokenizer(d: Path) -> Any:
    """The tokenizer saved in a model directory.

    Raises:
        UserError: the directory holds no tokenizer files, or they do not load.
    """
    # transformers takes seconds to import: loaded on first use
    from transformers import AutoTokenizer

    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"model directory {d} has no tokenizer files (one of tokenizer.json, "
            "tokenizer_config.json, tokenizer.model, vocab.json, ...): save the model's "
            f"tokenizer there with tokenizer.save_pretrained({str(d)!r})"
        )
    try:
        return AutoTokenizer.from_pretrained(d)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad input here
        raise UserError(f"cannot load the tokenizer in {d}: {one_line(exc)}") from exc


def check_float_checkpoint(d: Path) -> None:
    """Refuse a checkpoint that is already quantized (``quantization_config`` in config.json).

    Raises:
        UserError: config.json is unreadable or names a quantization method.
    """
    config = d / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {config}: {one_line(exc)}") from exc
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise UserError(
            f"model directory {d} is already quantized (quantization_config: quant_method="
            f"{method}); quantize its float checkpoint instead"
        )
