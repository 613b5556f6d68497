"""`slimc::expert_linear`: each row times its expert's weight, as transformers' gathered bmm."""

from __future__ import annotations

import pytest
import torch

import slimc.ops  # noqa: F401  (registers slimc:: ops)

expert_linear = torch.ops.slimc.expert_linear


def _gathered_bmm(x, weight, ids, bias):
    out = torch.bmm(weight[ids], x.unsqueeze(-1)).squeeze(-1)
    return out if bias is None else out + bias[ids]


@pytest.mark.parametrize("with_bias", [False, True])
def test_expert_linear_equals_the_gathered_bmm(with_bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 16, generator=g)
    weight = torch.randn(6, 12, 16, generator=g)
    ids = torch.tensor([5, 0, 0, 3, 5, 5, 1, 0, 3, 3, 1, 5, 0, 0, 1, 3, 5, 0, 1, 3, 5, 5, 0])
    bias = torch.randn(6, 12, generator=g) if with_bias else None  # expert 2 and 4 get no row
    got = expert_linear(x, weight, ids, bias)
    torch.testing.assert_close(got, _gathered_bmm(x, weight, ids, bias), rtol=1e-5, atol=1e-5)


def test_expert_linear_with_no_rows_and_in_bf16() -> None:
    weight = torch.randn(4, 8, 16)
    empty = expert_linear(torch.randn(0, 16), weight, torch.zeros(0, dtype=torch.long), None)
    assert empty.shape == (0, 8)
    x, ids = torch.randn(5, 16, dtype=torch.bfloat16), torch.tensor([3, 1, 3, 0, 2])
    out = expert_linear(x, weight.bfloat16(), ids, None)
    assert out.dtype == torch.bfloat16
    want = _gathered_bmm(x.float(), weight.bfloat16().float(), ids, None)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_expert_linear_refuses_ids_out_of_range_and_bad_shapes() -> None:
    weight = torch.randn(4, 8, 16)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        expert_linear(torch.randn(2, 16), weight, torch.tensor([0, 4]), None)
    with pytest.raises(ValueError, match="weight \\[E, N, K\\]"):
        expert_linear(torch.randn(2, 16), weight[0], torch.tensor([0, 1]), None)
    with pytest.raises(ValueError, match="bias must be \\[E, N\\]"):
        expert_linear(torch.randn(2, 16), weight, torch.tensor([0, 1]), torch.randn(8))


def test_expert_linear_gradients_equal_the_gathered_bmm() -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([2, 0, 2, 1, 0, 2, 2])
    inputs = [torch.randn(7, 5, generator=g), torch.randn(3, 4, 5, generator=g)]
    inputs.append(torch.randn(3, 4, generator=g))
    ours = [t.clone().requires_grad_() for t in inputs]
    theirs = [t.clone().requires_grad_() for t in inputs]
    expert_linear(ours[0], ours[1], ids, ours[2]).pow(2).sum().backward()
    _gathered_bmm(theirs[0], theirs[1], ids, theirs[2]).pow(2).sum().backward()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
