"""Perplexity evaluation over non-overlapping fixed-length windows (the shared protocol)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimc.errors import UserError
from slimc.weight_source import widened_forward

__all__ = ["PPLResult", "count_windows", "perplexity"]

logger = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 30.0
"""Without a terminal, a progress line is logged at most this often."""


@dataclass(frozen=True)
class PPLResult:
    """Result of a perplexity run.

    Attributes:
        ppl: ``exp(nll)``.
        nll: Token-weighted mean negative log-likelihood (nats).
        n_tokens: Number of predicted tokens (``windows * (seqlen - 1)``).
        windows: Number of windows evaluated.
        seconds: Wall time of the evaluation.
    """

    ppl: float
    nll: float
    n_tokens: int
    windows: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"PPL {self.ppl:.3f} (nll {self.nll:.4f}, {self.n_tokens} tokens, "
            f"{self.windows} windows, {self.seconds:.1f} s)"
        )


def _is_hf_model(model: Any) -> bool:
    try:
        # transformers takes seconds to import: loaded on first use
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _model_device(model: Any) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is None:
            p = next(model.buffers(), None)
        if p is not None and p.device.type != "meta":
            return p.device
    return None


def _extract_logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        logits = out
    elif hasattr(out, "logits"):
        logits = out.logits
    elif isinstance(out, dict) and "logits" in out:
        logits = out["logits"]
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    else:
        raise TypeError(
            f"model returned {type(out).__name__}; expected logits or an object with .logits"
        )
    if logits.dim() == 3:
        if logits.shape[0] != 1:
            raise ValueError(f"expected batch size 1 logits, got shape {tuple(logits.shape)}")
        logits = logits[0]
    if logits.dim() != 2:
        raise ValueError(f"expected logits [1, L, V] or [L, V], got {tuple(logits.shape)}")
    return logits


def _token_stream(token_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(token_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise UserError(f"token_ids must be 1-D [T], got shape {tuple(ids.shape)}")
    return ids


def count_windows(token_ids: torch.Tensor, windows: int | None = 40, seqlen: int = 512) -> int:
    """How many windows `perplexity` evaluates; checks the request before any model runs.

    Raises:
        UserError: `windows` is below 1 or more than the text's full windows, `seqlen < 2`.
    """
    ids = _token_stream(token_ids)
    if seqlen < 2:
        raise UserError(f"seqlen must be >= 2, got {seqlen}")
    available = ids.numel() // seqlen
    if available < 1:
        raise UserError(
            f"evaluation text has {ids.numel()} tokens, fewer than one {seqlen}-token window"
        )
    n = available if windows is None else int(windows)
    if n < 1 or n > available:
        raise UserError(
            f"asked for {windows} windows of {seqlen} tokens; the text has "
            f"{ids.numel()} tokens = {available} full windows"
        )
    return n


class _ProgressLog:
    """Progress lines on the log when there is no terminal for a bar (a logged run)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.start = self.last = time.perf_counter()

    def update(self, done: int, ppl: float) -> None:
        now = time.perf_counter()
        if not self.enabled or done == self.total or now - self.last < PROGRESS_LOG_SECONDS:
            return
        self.last = now
        logger.info(
            "perplexity: %d/%d windows, running PPL %.3f, %.0f s",
            done,
            self.total,
            ppl,
            now - self.start,
        )


def perplexity(
    model: Callable[..., Any],
    token_ids: torch.Tensor,
    windows: int | None = 40,
    seqlen: int = 512,
    bos_token_id: int | None = None,
    progress: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> PPLResult:
    """Compute perplexity on the first ``windows`` non-overlapping ``seqlen``-token windows.

    Each window is scored independently: its ``seqlen - 1`` next-token predictions
    (token ``i`` predicted from tokens ``< i`` of the same window) are averaged, and the
    result is ``exp`` of the token-weighted mean NLL over all windows. With
    ``bos_token_id`` the model sees ``[BOS] + window`` (``--bos-per-window``); the scored
    predictions stay the same ``seqlen - 1`` window tokens, so counts compare.

    Args:
        model: HF causal LM (called with ``use_cache=False``) or any callable mapping
            ``input_ids [1, L]`` to logits ``[1, L, V]`` or an object with ``.logits``.
        token_ids: Token stream, LongTensor ``[T]`` (or ``[1, T]``).
        windows: Number of windows; ``None`` uses every full window.
        seqlen: Window length in tokens.
        bos_token_id: If given, prepend this token to every window.
        progress: Show a tqdm bar when stderr is a TTY, else log a progress line every
            ``PROGRESS_LOG_SECONDS``.
        compute_dtype: For an ``nn.Module`` stored in a narrower float dtype (a bf16
            checkpoint), compute in this dtype, widening one module's weights at a time
            (``float32`` gives the figure of the float32 model without a float32 copy).

    Returns:
        A ``PPLResult``.

    Raises:
        UserError: Fewer tokens than one window, or more windows requested than available.
    """
    ids = _token_stream(token_ids)
    n = count_windows(ids, windows, seqlen)
    ids = ids.long()
    hf = _is_hf_model(model)
    device = _model_device(model)
    if isinstance(model, torch.nn.Module) and model.training:
        logger.warning("model is in training mode; evaluating anyway (call model.eval())")

    tty = sys.stderr.isatty()
    bar = tqdm(total=n, desc="perplexity", unit="win", leave=False, disable=not progress or not tty)
    lines = _ProgressLog(n, enabled=progress and not tty)
    t0 = time.perf_counter()
    total_nll, total_n = 0.0, 0
    widened = (
        widened_forward(model, compute_dtype)
        if isinstance(model, torch.nn.Module) and compute_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with torch.inference_mode(), widened:
            for w in range(n):
                window = ids[w * seqlen : (w + 1) * seqlen]
                inp = window
                if bos_token_id is not None:
                    inp = torch.cat([window.new_tensor([bos_token_id]), window])
                inp = inp.unsqueeze(0)
                if device is not None:
                    inp = inp.to(device)
                out = model(input_ids=inp, use_cache=False) if hf else model(inp)
                logits = _extract_logits(out)
                if logits.shape[0] != inp.shape[1]:
                    raise ValueError(
                        f"model returned {logits.shape[0]} positions for "
                        f"{inp.shape[1]} input tokens"
                    )
                off = 0 if bos_token_id is None else 1
                pred = logits[off : off + seqlen - 1].float()
                target = window[1:].to(pred.device)
                nll = F.cross_entropy(pred, target, reduction="none").double().sum().item()
                total_nll += nll
                total_n += seqlen - 1
                running = math.exp(total_nll / total_n)
                bar.update(1)
                bar.set_postfix(ppl=f"{running:.3f}")
                lines.update(w + 1, running)
                logger.debug("window %d/%d: nll %.4f", w + 1, n, nll / (seqlen - 1))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    mean = total_nll / total_n
    result = PPLResult(ppl=math.exp(mean), nll=mean, n_tokens=total_n, windows=n, seconds=seconds)
    logger.info("%s", result)
    return result
