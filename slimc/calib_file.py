"""The user's own calibration data: samples read from a .jsonl or .txt file and tokenized."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimc.errors import UserError

__all__ = ["CALIB_FILE_FORMATS", "TextSample", "calibration_file_samples", "read_calibration_texts"]

CALIB_FILE_FORMATS = (
    ".jsonl: one JSON object per line with the sample in a \"text\" string; "
    ".txt: samples separated by blank lines"
)


@dataclass(frozen=True)
class TextSample:
    """One calibration sample and where it is in its file (for error messages)."""

    text: str
    where: str


def _read(path: Path) -> str:
    if not path.exists():
        raise UserError(f"calibration data {path} does not exist")
    if path.is_dir():
        raise UserError(f"calibration data {path} is a directory, not a .jsonl or .txt file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"cannot read calibration data {path}: not UTF-8 text (byte {exc.start})"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read calibration data {path}: {exc.strerror or exc}") from None


def _jsonl_samples(path: Path, content: str) -> list[TextSample]:
    samples = []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) hold no sample
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            reason = str(exc).split(":")[0]
            raise UserError(f"calibration data {where}: not valid JSON ({reason})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f'calibration data {where}: no "text" string in {line.strip()[:60]}')
        if not text.strip():
            raise UserError(f'calibration data {where}: the "text" is empty')
        samples.append(TextSample(text, where))
    return samples


def _txt_samples(path: Path, content: str) -> list[TextSample]:
    samples = []
    line = 1
    # odd parts are the separators: a run of blank lines (white space only)
    for i, part in enumerate(re.split(r"(\n[^\S\n]*\n(?:[^\S\n]*\n)*)", content)):
        if i % 2 == 0 and part.strip():
            start = line + part[: len(part) - len(part.lstrip())].count("\n")
            where = f"{path} sample {len(samples) + 1} (line {start})"
            samples.append(TextSample(part.strip(), where))
        line += part.count("\n")
    return samples


def read_calibration_texts(path: str | os.PathLike[str]) -> list[TextSample]:
    """The text samples of a calibration file, in file order.

    ``.jsonl``: one JSON object per line, the sample in its ``"text"`` string (blank lines are
    skipped). ``.txt``: samples separated by blank lines (lines holding only white space).

    Raises:
        UserError: the file is missing or unreadable, its extension is neither, a JSONL line
            is not JSON or has no ``"text"`` string (the line number is named), a sample is
            empty, or the file holds no sample.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        shown = f"extension {suffix!r}" if suffix else "no extension"
        raise UserError(f"calibration data {p} has {shown}; expected {CALIB_FILE_FORMATS}")
    content = _read(p)
    samples = _jsonl_samples(p, content) if suffix == ".jsonl" else _txt_samples(p, content)
    if not samples:
        raise UserError(f"calibration data {p} holds no sample")
    return samples


def calibration_file_samples(
    tokenizer: Any, path: str | os.PathLike[str], n: int | None = None, seqlen: int = 512
) -> list[torch.Tensor]:
    """Calibration samples from the user's file (see `read_calibration_texts`).

    Each sample is tokenized with the tokenizer's own special tokens (as the packaged
    calibration text is) and truncated to `seqlen` tokens.

    Args:
        tokenizer: HF tokenizer.
        path: a ``.jsonl`` or ``.txt`` file.
        n: take the first `n` samples; ``None`` takes them all. A file with fewer than `n`
            samples is an error (the count asked for is not silently lowered).
        seqlen: maximum tokens per sample.

    Returns:
        LongTensors of shape ``[1, L]`` with ``1 <= L <= seqlen``, in file order.

    Raises:
        UserError: see `read_calibration_texts`; also ``n < 1``, ``seqlen < 1``, fewer
            samples than `n`, or a sample that tokenizes to no token.
    """
    if n is not None and n < 1:
        raise UserError(f"the number of calibration samples must be at least 1, got {n}")
    if seqlen < 1:
        raise UserError(f"the calibration sequence length must be at least 1, got {seqlen}")
    samples = read_calibration_texts(path)
    if n is not None:
        if len(samples) < n:
            raise UserError(
                f"calibration data {Path(path).expanduser()} holds {len(samples)} samples, "
                f"fewer than the {n} asked for"
            )
        samples = samples[:n]
    ids = tokenizer([s.text for s in samples], add_special_tokens=True, verbose=False)
    out = []
    for sample, tokens in zip(samples, ids["input_ids"], strict=True):
        if not tokens:
            raise UserError(f"calibration data {sample.where}: the sample gives no token")
        out.append(torch.tensor(tokens[:seqlen], dtype=torch.long).unsqueeze(0))
    return out
