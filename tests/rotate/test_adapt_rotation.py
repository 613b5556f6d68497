"""adapt-rotation: the Procrustes learning, input collection, and the exact pass on Llama."""

from __future__ import annotations

import pytest
import torch

import slimc
from slimc.errors import UserError
from slimc.pass_base import OptionError
from slimc.pass_manager import PassManager
from slimc.passes.adapt_rotation import AdaptRotation, collect_inputs
from slimc.program import Program, RunContext, node_loc
from slimc.rotate.adapt import (
    fake_quant_per_token,
    learn_rotation,
    pick_rows,
    procrustes,
    quant_error,
    spread,
)
from slimc.rotate.hadamard import random_hadamard
from tests.models import captured, tiny_llama

TOLERANCE = 1e-4  # max |out - ref| / max |ref|, fp32 (as for quarot)
EYE_TOL = 1e-10
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def with_random_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights away from 1, so fusing them into the fitted linears' inputs matters."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    return model


def calibration(n: int = 8, seq: int = 32) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 128, (1, seq), generator=gen),) for _ in range(n)]


def calibrated_llama() -> Program:
    program = captured("llama")
    program.calibration = calibration()
    program.context = RunContext(progress=False)
    return program


def outlier_rows(rows: int = 512, k: int = 32, seed: int = 0) -> torch.Tensor:
    """Rows with a few large channels, the case a rotation helps per-token quantization."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen, dtype=torch.float64)
    x[:, :3] *= 20.0
    return x


def orthogonality(r: torch.Tensor) -> float:
    return float((r.T @ r - torch.eye(r.shape[0], dtype=r.dtype)).abs().max())


# -- the algorithm ---------------------------------------------------------------------------------
def test_fake_quant_is_symmetric_per_token_with_a_scale_floor() -> None:
    x = torch.tensor([[7.0, -3.5, 1.0, 0.2], [0.0, 0.0, 0.0, 0.0], [1e-6, -2e-6, 0.0, 0.0]])
    q = fake_quant_per_token(x, 4)
    torch.testing.assert_close(q[0], torch.tensor([7.0, -4.0, 1.0, 0.0]))  # scale 1, ties to even
    assert torch.equal(q[1], torch.zeros(4))
    assert torch.equal(q[2], torch.zeros(4))  # scale clamped to 1e-5: tiny rows round to zero
    assert quant_error(x[:1], 4) == pytest.approx((0.5**2 + 0.2**2) / 4)


def test_procrustes_recovers_a_rotation_and_completes_the_null_space_with_identity() -> None:
    a = outlier_rows(200, 16)
    truth = random_hadamard(16, 5)
    r = procrustes(a.T @ (a @ truth))
    torch.testing.assert_close(r, truth, rtol=0, atol=1e-10)
    # fewer rows than channels: C has rank 4; R is still orthogonal and fixes what C never sees
    few = a[:4]
    r = procrustes(few.T @ (few @ truth))
    assert orthogonality(r) < EYE_TOL
    torch.testing.assert_close(few @ r, few @ truth, rtol=0, atol=1e-9)
    assert torch.equal(procrustes(torch.zeros(8, 8, dtype=torch.float64)), torch.eye(8).double())


def test_learning_lowers_the_error_keeps_the_best_and_stops_early() -> None:
    a = outlier_rows() @ random_hadamard(32, 1234)
    result = learn_rotation(a, bits=4, steps=20, patience=5, min_steps=6)
    assert orthogonality(result.rotation) < EYE_TOL
    assert result.best == min(result.losses) and result.best < 0.9 * result.initial
    assert result.best == pytest.approx(quant_error(a @ result.rotation, 4))
    assert result.reduction == pytest.approx(100 * (1 - result.best / result.initial))
    # a rotation already optimal for its data gives no new best: stop at min-steps + patience ...
    flat = torch.ones(64, 8, dtype=torch.float64)
    stuck = learn_rotation(flat, bits=4, steps=20, patience=2, min_steps=3)
    assert stuck.steps == 3 and stuck.best_step == 0
    assert torch.equal(stuck.rotation, torch.eye(8, dtype=torch.float64))
    # ... and zero steps leave the identity
    assert learn_rotation(a, steps=0).steps == 0


def test_rows_are_spread_evenly() -> None:
    assert spread(10, 3) == [3, 3, 4] and sum(spread(2048, 30)) == 2048 and spread(1, 4)[-1] == 1
    x = torch.arange(20.0).reshape(1, 10, 2)
    assert pick_rows(x, 2)[:, 0].tolist() == [4.0, 14.0]  # the middles of tokens 0-4 and 5-9
    assert pick_rows(x, 20).shape == (10, 2) and pick_rows(x, 0).shape == (0, 2)


def test_collected_rows_are_the_float_inputs_of_the_matched_linears() -> None:
    program = calibrated_llama()
    ups = [n for n in program.graph.nodes if (node_loc(n) or "").endswith("up_proj")]
    assert len(ups) == 2
    everything = collect_inputs(program, ups, program.calibration, 10_000, progress=False)
    assert everything.shape == (2 * 8 * 32, 64)  # every token of every sample, both layers
    some = collect_inputs(program, ups, program.calibration, 12, progress=False)
    assert some.shape == (12, 64)
    # each picked row is one of the recorded inputs (6 per layer, over 6 of the 8 samples)
    for row in some:
        assert bool((everything - row).abs().amax(dim=1).min() == 0)


# -- the pass ----------------------------------------------------------------------------------
def test_adapted_rotation_keeps_logits_and_lowers_the_reported_error() -> None:
    program = calibrated_llama()
    with torch.no_grad():
        ref = program(IDS)
    table = program.weights.get("lm_head.weight").detach().double()  # tied with the embedding
    PassManager.parse("adapt-rotation").run(program)
    with torch.no_grad():
        assert rel_err(program(IDS), ref) < TOLERANCE
    stats = program.statistics["adapt-rotation"]
    assert stats["quant error after (X Q R, learned)"] < stats["quant error before (X Q, Hadamard)"]
    assert stats["quant error reduction (%)"] > 1.0
    assert stats["fitted input rows"] == 2 * 8 * 32 and stats["fitted linears"] == 2
    assert stats["rotated linears"] == 15 and stats["fused norms"] == 5
    # the embedding is E Q R: orthogonal, and no longer QuaRot's E Q
    rotated = program.weights.get("model.embed_tokens.weight").double()
    q_r = torch.linalg.lstsq(table, rotated).solution
    assert orthogonality(q_r) < 1e-5
    assert not torch.allclose(q_r, random_hadamard(64, 1234), atol=1e-3)


def test_compile_writes_back_the_adapted_rotation() -> None:
    model = with_random_norms(tiny_llama(layers=2))
    rotated = slimc.compile(
        model,
        "adapt-rotation{layer-type=q_proj,up_proj max-samples=256}",
        calib=calibration(),
        progress=False,
    )
    assert rel_err(logits(rotated), logits(model)) < TOLERANCE
    stats = rotated.slimc_program.statistics["adapt-rotation"]
    assert stats["fitted linears"] == 4 and stats["fitted input rows"] == 256
    with torch.no_grad():
        assert torch.equal(rotated.slimc_program(IDS), logits(rotated))


def test_options_and_refusals() -> None:
    assert AdaptRotation().needs_calibration and AdaptRotation().exact
    for bad, match in [
        ({"online": True}, "online=true is not supported"),
        ({"quant_bits": 1}, "quant-bits"),
        ({"max_samples": 0}, "max-samples"),
        ({"layer_type": ()}, "layer-type"),
        ({"patience": 0}, "patience"),
    ]:
        with pytest.raises(OptionError, match=match):
            AdaptRotation(**bad)
    program = calibrated_llama()
    with pytest.raises(UserError, match="no linear reading the residual stream matches"):
        PassManager.parse("adapt-rotation{layer-type=down_proj}").run(program)
    gemma = captured("gemma2")
    gemma.calibration = calibration()
    with pytest.raises(UserError, match=r"adapt-rotation: type_as_1 .*quarot rotates it at run"):
        PassManager.parse("adapt-rotation").run(gemma)
    program = captured("llama")
    with pytest.raises(UserError, match="needs calibration data"):
        PassManager.parse("adapt-rotation").run(program)


# -- SmolLM2 ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_adapt_rotation_keeps_smollm2_logits() -> None:
    """SmolLM2-135M (hidden 576): the adapted rotation is exact and lowers the int4 error."""
    from slimc.data import calibration_samples, eval_token_ids, load_model

    model, tok = load_model(None)
    window = eval_token_ids(tok)[:512].unsqueeze(0)
    with torch.no_grad():
        ref = model(window).logits
    rotated = slimc.compile(
        model, "adapt-rotation", calib=calibration_samples(tok, n=32), progress=False
    )
    with torch.no_grad():
        graph = rotated.slimc_program(window)
        out = rotated(window).logits
    err_graph, err_model = rel_err(graph, ref), rel_err(out, ref)
    stats = rotated.slimc_program.statistics["adapt-rotation"]
    print(
        f"\nSmolLM2 adapt-rotation: max relative logit error graph {err_graph:.3g}, model "
        f"{err_model:.3g}; int4 per-token error {stats['quant error unrotated (X)']:.4g} "
        f"unrotated, {stats['quant error before (X Q, Hadamard)']:.4g} Hadamard, "
        f"{stats['quant error after (X Q R, learned)']:.4g} learned "
        f"({stats['quant error reduction (%)']:.1f}% lower, "
        f"{stats['learning steps taken']} steps)"
    )
    assert err_graph < TOLERANCE and err_model < TOLERANCE
    assert stats["quant error reduction (%)"] > 0
    assert stats["rotated linears"] == 30 * 7 + 1 and stats["fitted linears"] == 30
