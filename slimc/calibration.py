"""Calibration-set helpers that need no tokenizer: packing token-id samples, picking a subset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["evenly_spaced", "pack_token_samples"]


def _token_ids(sample: Any, index: int) -> torch.Tensor:
    if isinstance(sample, torch.Tensor):
        sample = (sample,)
    if not (isinstance(sample, (tuple, list)) and len(sample) == 1):
        raise ValueError(f"calibration sample {index} is not a single token-id tensor")
    ids = sample[0]
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"calibration sample {index} is not an integer token-id tensor")
    if ids.dim() not in (1, 2):
        raise ValueError(
            f"calibration sample {index} has shape {list(ids.shape)}; expected [L] or [B, L]"
        )
    return ids.reshape(-1)


def pack_token_samples(
    samples: Sequence[Any], seqlen: int, min_len: int | None = None
) -> list[tuple[torch.Tensor]]:
    """Concatenate token-id samples in order and cut the stream into samples of `seqlen` tokens.

    Short documents are joined instead of dropped: every token of every sample is kept, in
    order (the rows of a `[B, L]` sample one after another), with whatever special tokens the
    samples already hold (a BOS per document, for example). Only the last, shorter chunk may be
    dropped: it is kept when it has at least `min_len` tokens, or when it is the only chunk.

    Args:
        samples: calibration samples, each a 1-tuple (or a bare tensor) of integer token ids
            of shape `[L]` or `[B, L]`.
        seqlen: tokens per packed sample.
        min_len: shortest last chunk kept (default `seqlen // 2`).

    Returns:
        1-tuples holding `[1, seqlen]` tensors (the last may be shorter), of the samples' dtype.

    Raises:
        ValueError: `seqlen < 1`, no samples, or a sample that is not one integer tensor.
    """
    if seqlen < 1:
        raise ValueError(f"seqlen must be >= 1, got {seqlen}")
    if not samples:
        raise ValueError("no calibration samples to pack")
    stream = torch.cat([_token_ids(s, i) for i, s in enumerate(samples)])
    keep_last = seqlen // 2 if min_len is None else min_len
    chunks = list(stream.split(seqlen))
    if len(chunks) > 1 and chunks[-1].numel() < max(keep_last, 1):
        chunks.pop()
    return [(c.clone().unsqueeze(0),) for c in chunks]


def evenly_spaced(samples: Sequence[Any], count: int) -> list[Any]:
    """`count` samples spread evenly over `samples` (all of them for count <= 0 or too large)."""
    n = len(samples)
    if count <= 0 or count >= n:
        return list(samples)
    return [samples[(i * n) // count] for i in range(count)]
