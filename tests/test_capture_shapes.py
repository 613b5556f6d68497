"""Capture with the user's example inputs: any batch / length, and the graph stays dynamic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimc
from slimc.capture import capture, exportable_token_ids
from slimc.errors import UserError
from tests.models import tiny_llama, tiny_mlp


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def batch2_len40() -> torch.Tensor:
    return torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(1, 64), (1, 1), (3, 8), (3, 3), (64,)])
def test_any_example_shape_captures_a_dynamic_graph(model, batch2_len40, shape) -> None:
    ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(4))
    compiled = slimc.compile(model, "", example_inputs=(ids,), progress=False)
    out = compiled.slimc_program(batch2_len40)
    torch.testing.assert_close(out, model(batch2_len40).logits, rtol=0, atol=0)


def test_batch1_example_with_quarot_runs_other_shapes(model, batch2_len40) -> None:
    """The reported failure: quarot with a batch-1 x 64 example ended in a torch.export error."""
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(5))
    compiled = slimc.compile(model, "quarot", example_inputs=(ids,), progress=False)
    reference = model(batch2_len40).logits
    assert _rel(compiled.slimc_program(batch2_len40), reference) < 1e-4
    assert _rel(compiled(batch2_len40).logits, reference) < 1e-4


def test_widened_example_keeps_the_users_tokens() -> None:
    ids = torch.tensor([[5, 7, 9]], dtype=torch.int32)
    (wide,) = exportable_token_ids(nn.Module(), (ids,))
    assert wide.dtype == torch.int32
    assert wide.shape[0] >= 2 and wide.shape[1] >= 2 and wide.shape[0] != wide.shape[1]
    assert set(wide.flatten().tolist()) <= {5, 7, 9}
    assert torch.equal(wide[0, :3], ids[0])


def test_the_program_keeps_an_exportable_example(model) -> None:
    program = capture(model, (torch.randint(0, 128, (1, 1)),))
    (example,) = program.example_inputs
    assert example.shape[0] >= 2 and example.shape[1] >= 2


@pytest.mark.parametrize(
    "bad",
    [
        (torch.randn(1, 8),),
        (torch.ones(1, 8, dtype=torch.long),) * 2,
        (torch.ones(1, 2, 3, dtype=torch.long),),
    ],
)
def test_unusable_example_for_a_causal_lm_is_a_user_error(model, bad) -> None:
    with pytest.raises(UserError, match="example_inputs for LlamaForCausalLM must be one tensor"):
        capture(model, bad)


def test_plain_module_example_inputs_still_work() -> None:
    mlp = tiny_mlp()
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(6))
    compiled = slimc.compile(mlp, "w8a16", example_inputs=(x,), progress=False)
    assert _rel(compiled(x), mlp(x)) < 2e-2
    torch.testing.assert_close(compiled.slimc_program(x), compiled(x), rtol=1e-5, atol=1e-5)
