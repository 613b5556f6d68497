"""float-sparse: ADMM pruning, short-mantissa rounding with protection, and the pass on Llama.

Sparsity contract: every sparsified linear [N, K] has exactly `round(sparse-ratio * N * K)` zero
weights (Python's round, half to even): ADMM zeroes exactly the masked entries, and the rounding
keeps zeros zero and non-zero weights non-zero.
"""

from __future__ import annotations

import copy

import pytest
import torch

import slimc
from slimc.pass_base import OptionError
from slimc.pass_manager import PassManager
from slimc.passes.float_sparse import FloatSparse
from slimc.program import Program, RunContext, node_loc
from slimc.quant.admm import (
    AdmmConfig,
    admm_prune,
    magnitude_prune,
    output_error,
    prune_count,
    relative_output_error,
)
from slimc.quant.mantissa import protected_round, round_mantissa
from tests.models import captured, tiny_llama

IDS = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(9))


def correlated_inputs(k: int, rows: int = 2048, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * 0.2
    scales = torch.linspace(0.2, 3.0, k)
    return (
        torch.randn(rows, k, generator=gen) @ mix + torch.randn(rows, k, generator=gen)
    ) * scales


def calibration() -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 128, (1, 64), generator=gen),) for _ in range(16)]


def calibrated_llama() -> Program:
    program = captured("llama")
    program.calibration = calibration()
    program.context = RunContext(progress=False)
    return program


def mantissa_bits_used(x: torch.Tensor) -> torch.Tensor:
    """The fp16 mantissa bits below the top two that are set, per element (0 = fits 2 bits)."""
    return (x.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFF) != 0


# -- ADMM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "ratio"), [((40, 96), 0.3), ((33, 64), 0.5), ((16, 48), 0.05)])
def test_admm_prunes_exactly_the_ratio_and_beats_magnitude_pruning(shape, ratio) -> None:
    x = correlated_inputs(shape[1])
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    sparse = admm_prune(w, hessian, AdmmConfig(ratio))
    assert sparse.dtype == w.dtype and sparse.shape == w.shape
    assert int((sparse == 0).sum()) == prune_count(w.numel(), ratio)
    magnitude = magnitude_prune(w, ratio)
    assert int((magnitude == 0).sum()) == prune_count(w.numel(), ratio)
    ours, theirs = output_error(w, sparse, hessian), output_error(w, magnitude, hessian)
    assert ours < 0.8 * theirs
    assert relative_output_error(w, sparse, hessian) == pytest.approx(
        ours / output_error(w, torch.zeros_like(w), hessian)
    )


def test_admm_with_nothing_to_prune_keeps_the_weight_and_dead_inputs_go_first() -> None:
    x = correlated_inputs(32)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    hessian = 2 * x.T @ x / x.shape[0]
    torch.testing.assert_close(admm_prune(w, hessian, AdmmConfig(0.0)), w, rtol=1e-4, atol=1e-5)
    x[:, :4] = 0.0  # four input channels never fire: their 32 weights are the ones pruned
    sparse = admm_prune(w, 2 * x.T @ x / x.shape[0], AdmmConfig(0.125))
    assert torch.equal(sparse[:, :4], torch.zeros(8, 4)) and bool((sparse[:, 4:] != 0).all())
    with pytest.raises(ValueError, match="do not match"):
        admm_prune(w, torch.eye(16))
    with pytest.raises(ValueError, match="sparse ratio"):
        AdmmConfig(1.0)


# -- rounding --------------------------------------------------------------------------------------
def test_round_mantissa_to_two_bits_is_round_to_nearest_and_keeps_zeros_apart() -> None:
    x = torch.tensor([1.1, 1.125, 1.2, 1.375, 1.875, -1.3, 0.0, 1e-9, -3e-6, 7e4, 0.01])
    want = [1.0, 1.0, 1.25, 1.5, 2.0, -1.25, 0.0, 2.0**-16, -(2.0**-16), 57344.0, 0.009765625]
    assert round_mantissa(x, 2).tolist() == want
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    w = w.sign() * w.abs().clamp(min=1e-3)  # normal fp16 numbers
    r = round_mantissa(w, 2)
    assert not bool(mantissa_bits_used(r).any())
    # the nearest such value: within half a step 2^(e - 2) (plus fp16's own rounding at ties)
    exponent = torch.floor(torch.log2(w.abs()))
    assert bool(((r - w).abs() <= 2.0 ** (exponent - 3) * (1 + 2.0**-8)).all())
    assert torch.equal(round_mantissa(w, 10), w.half().float())
    with pytest.raises(ValueError, match="keep-bits"):
        round_mantissa(w, 11)


def test_protection_keeps_exactly_the_requested_proportion_in_fp16() -> None:
    w = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    importance = torch.linspace(0.1, 2.0, 40)
    out, kept = protected_round(w, importance, keep_bits=2, keep_proportion=0.02)
    assert int(kept.sum()) == round(0.02 * w.numel()) == 40
    rounded = round_mantissa(w, 2)
    assert torch.equal(out[kept], w.half().float()[kept])
    assert torch.equal(out[~kept], rounded[~kept])
    assert int((out != rounded).sum()) == 40  # exactly the protected weights are not rounded
    score = (w - rounded).abs() * importance
    assert float(score[kept].min()) >= float(score[~kept].max())
    none, kept0 = protected_round(w, importance, 2, 0.0)
    assert not bool(kept0.any()) and torch.equal(none, rounded)


# -- the pass ----------------------------------------------------------------------------------
def test_float_sparse_pass_prunes_every_linear_but_lm_head_to_the_ratio() -> None:
    program = calibrated_llama()
    before = {k: v.clone() for k, v in program.weights.items()}
    PassManager.parse("float-sparse").run(program)
    linears = [n for n in program.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 15  # still aten.linear on float constants, nothing added
    assert not [n for n in program.graph.nodes if "slimc" in str(n.target)]
    for node in linears:
        name = str(node.args[1].target)
        w = program.weights.get(name)
        if node_loc(node) == "lm_head":
            assert torch.equal(w, before[name])
            continue
        assert int((w == 0).sum()) == prune_count(w.numel(), 0.3), name
        assert int((before[name] == 0).sum()) == 0
        # 2-bit mantissas except the protected 2%
        assert int(mantissa_bits_used(w).sum()) <= round(0.02 * w.numel())
    stats = program.statistics["float-sparse"]
    assert stats["sparsified linears"] == 14
    assert stats["achieved sparsity (%)"] == pytest.approx(30.0, abs=0.01)
    assert stats["linears where ADMM beats magnitude pruning"] == 14
    assert (
        stats["mean relative output error (ADMM)"]
        < stats["mean relative output error (magnitude pruning)"]
    )
    # round(0.02 * numel) per linear: q/o 64x64 -> 82, k/v 32x64 -> 41, MLP 128x64 -> 164
    assert stats["weights kept in fp16 (precision protection)"] == 2 * (2 * 82 + 2 * 41 + 3 * 164)


def test_logits_are_finite_and_closer_to_float_than_magnitude_pruning() -> None:
    program = calibrated_llama()
    with torch.inference_mode():
        ref = program(IDS)
    magnitude = copy.deepcopy(program)
    for node in FloatSparse().targets(magnitude):
        name = str(node.args[1].target)
        magnitude.weights.set(name, magnitude_prune(magnitude.weights.get(name), 0.3))
    errors = {}
    for key, pipeline in [
        ("admm", "float-sparse"),
        ("plain", "float-sparse{round-mantissa=false}"),
    ]:
        p = copy.deepcopy(program)
        PassManager.parse(pipeline).run(p)
        with torch.inference_mode():
            out = p(IDS)
        assert bool(torch.isfinite(out).all())
        errors[key] = float((out - ref).pow(2).mean())
    with torch.inference_mode():
        errors["magnitude"] = float((magnitude(IDS) - ref).pow(2).mean())
    assert errors["plain"] < errors["admm"] < errors["magnitude"]


def test_only_rounding_off_and_quantization_after() -> None:
    program = calibrated_llama()
    PassManager.parse(
        'float-sparse{only="layers.0.mlp.*" round-mantissa=false sparse-ratio=0.5},w8a8-dynamic'
    ).run(program)
    stats = program.statistics["float-sparse"]
    assert stats["sparsified linears"] == 3
    assert "weights kept in fp16 (precision protection)" not in stats
    assert program.statistics["fuse-quantized-linear"]["fused linears"] == 14


def test_compile_writes_the_sparse_weights_back() -> None:
    model = tiny_llama(layers=2)
    sparse = slimc.compile(model, "float-sparse", calib=calibration(), progress=False)
    w = sparse.model.layers[1].mlp.down_proj.weight
    assert int((w == 0).sum()) == prune_count(w.numel(), 0.3)
    assert torch.equal(model.lm_head.weight, sparse.lm_head.weight)
    with torch.inference_mode():
        assert torch.equal(sparse.slimc_program(IDS), sparse(IDS).logits)


def test_options_are_checked() -> None:
    assert FloatSparse().needs_calibration and not FloatSparse().exact
    for bad, match in [
        ({"sparse_ratio": 1.0}, "sparse-ratio"),
        ({"mask_iters": 30}, "mask-iters"),
        ({"keep_bits": 11}, "keep-bits"),
        ({"keep_proportion": 1.5}, "keep-proportion"),
    ]:
        with pytest.raises(OptionError, match=match):
            FloatSparse(**bad)
