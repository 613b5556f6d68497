"""`slimc::expert_linear`: each row multiplied by the weight of the expert it was routed to."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["expert_linear"]


@torch.library.custom_op(
    "slimc::expert_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor expert_ids, Tensor? bias) -> Tensor",
)
def expert_linear(x: Tensor, weight: Tensor, expert_ids: Tensor, bias: Tensor | None) -> Tensor:
    """`out[s] = x[s] @ weight[expert_ids[s]].T (+ bias[expert_ids[s]])`.

    `x` is [S, K] (one row per token and chosen expert), `weight` [E, N, K] (each expert's
    linear weight, as `aten.linear` holds it), `expert_ids` [S], `bias` [E, N]; the result is
    [S, N] in `x`'s dtype. The rows of each expert are gathered and run as one linear, so no
    per-row copy of the weights is made (transformers' `batched_mm` makes one).

    Raises:
        ValueError: mismatched shapes, or an expert id outside [0, E).
    """
    _check(x, weight, expert_ids, bias)
    experts, n = weight.shape[0], weight.shape[1]
    out = x.new_empty((x.shape[0], n))
    if x.shape[0] == 0:
        return out
    ids = expert_ids.reshape(-1).long()
    if int(ids.min()) < 0 or int(ids.max()) >= experts:
        raise ValueError(f"expert ids must lie in [0, {experts}), got {ids.min()}..{ids.max()}")
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=experts).tolist()
    rows = x[order]
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            b = None if bias is None else bias[expert].to(x.dtype)
            pieces.append(F.linear(rows[start : start + count], weight[expert].to(x.dtype), b))
            start += count
    out[order] = torch.cat(pieces)
    return out


@expert_linear.register_fake
def _(x, weight, expert_ids, bias):
    _check(x, weight, expert_ids, bias)
    return x.new_empty((x.shape[0], weight.shape[1]))


def _check(x: Tensor, weight: Tensor, expert_ids: Tensor, bias: Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 3 or expert_ids.dim() != 1:
        raise ValueError(
            "expert_linear takes x [S, K], weight [E, N, K] and expert_ids [S]; got "
            f"{list(x.shape)}, {list(weight.shape)}, {list(expert_ids.shape)}"
        )
    torch._check(weight.shape[2] == x.shape[1], lambda: "expert_linear: weight K != x K")
    torch._check(expert_ids.shape[0] == x.shape[0], lambda: "expert_linear: one id per row")
    if bias is not None and list(bias.shape) != list(weight.shape[:2]):
        raise ValueError(f"expert_linear bias must be [E, N], got {list(bias.shape)}")
