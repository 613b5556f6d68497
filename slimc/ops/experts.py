"""`slimc::expert_linear`: each row multiplied by the weight of the expert it was routed to."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["expert_linear", "per_expert"]


def per_expert(
    x: Tensor, expert_ids: Tensor, experts: int, product: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """`product(e, rows)` on the rows of `x` routed to each expert `e` (each expert's rows run
    together), put back in row order.

    Raises:
        ValueError: an expert id outside [0, experts).
    """
    ids = expert_ids.reshape(-1).long()
    if int(ids.min()) < 0 or int(ids.max()) >= experts:
        raise ValueError(f"expert ids must lie in [0, {experts}), got {ids.min()}..{ids.max()}")
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=experts).tolist()
    rows = x[order]
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            pieces.append(product(expert, rows[start : start + count]))
            start += count
    products = torch.cat(pieces)  # in the products' dtype (autocast, an int kernel's out dtype)
    out = products.new_empty((x.shape[0], *products.shape[1:]))
    out[order] = products
    return out


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
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[1]))

    def product(expert: int, rows: Tensor) -> Tensor:
        b = None if bias is None else bias[expert].to(x.dtype)
        return F.linear(rows, weight[expert].to(x.dtype), b)

    return per_expert(x, expert_ids, weight.shape[0], product)


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


def _setup_context(ctx, inputs, output):
    x, weight, expert_ids, bias = inputs
    ctx.save_for_backward(x, weight, expert_ids)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """d/dx: each row times its expert's weight untransposed; d/dW, d/db: per-expert sums."""
    x, weight, expert_ids = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = expert_linear(grad, weight.transpose(1, 2), expert_ids, None)
    ids = expert_ids.reshape(-1).long()
    if ctx.needs_input_grad[1]:
        grad_w = torch.zeros_like(weight, dtype=grad.dtype)
        for expert in ids.unique().tolist():
            rows = ids == expert
            grad_w[expert] = grad[rows].T @ x[rows].to(grad.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = grad.new_zeros((weight.shape[0], grad.shape[1])).index_add_(0, ids, grad)
    return grad_x, grad_w, None, grad_b


expert_linear.register_autograd(_backward, setup_context=_setup_context)
