"""GPTQ: the column solve against a Hessian, and the `gptq` pass on a captured model."""

from __future__ import annotations

import copy

import pytest
import torch

from slimc.capture import capture
from slimc.pass_base import OptionError
from slimc.pass_manager import PassManager
from slimc.passes.gptq import GPTQ
from slimc.program import Program
from slimc.quant.gptq import gptq_quantize, hessian_error, hessian_factor
from slimc.quant.hessian import HessianAccumulator
from slimc.quant.qparams import quantize_weight
from slimc.quant.scheme import TensorQuantSpec
from tests.models import tiny_llama, with_token_calibration

SPECS = [
    TensorQuantSpec(4, False, "channel"),
    TensorQuantSpec(4, True, "group", 32),
    TensorQuantSpec(4, False, "group", 32),
    TensorQuantSpec(8, True, "channel"),
]


def correlated_inputs(k: int, rows: int = 2048, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * 0.2
    scales = torch.linspace(0.2, 3.0, k)
    return (
        torch.randn(rows, k, generator=gen) @ mix + torch.randn(rows, k, generator=gen)
    ) * scales


def test_hessian_accumulator_is_the_running_average_of_2xxT() -> None:
    x = correlated_inputs(48, rows=300)
    acc = HessianAccumulator(48)
    for part in (x[:7], x[7:200], x[200:]):
        acc.update(part.reshape(1, -1, 48))
    assert acc.rows == 300
    torch.testing.assert_close(acc.hessian, 2 * x.T @ x / 300, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="48 features"):
        acc.update(torch.ones(3, 47))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.full((2, 48), float("nan")))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-sym{s.symmetric}")
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rounding_on_the_hessian_error(spec: TensorQuantSpec, act_order: bool) -> None:
    x = correlated_inputs(96)
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(3))
    result = gptq_quantize(w, hessian, spec, block_size=32, act_order=act_order)
    qw = result.weight
    assert qw.qdata.dtype == torch.int8 and qw.qdata.shape == w.shape
    assert int(qw.qdata.min()) >= spec.qmin and int(qw.qdata.max()) <= spec.qmax
    assert (qw.zero_point is None) == spec.symmetric
    rtn = hessian_error(w, quantize_weight(w, spec).dequantize(), hessian)
    ours = hessian_error(w, qw.dequantize(), hessian)
    assert ours < 0.9 * rtn


@pytest.mark.parametrize("act_order", [False, True])
def test_one_factor_serves_every_weight_reading_the_input(act_order: bool) -> None:
    """q, k and v share a Hessian: quantizing each against one shared factorization gives
    bit for bit what factoring it once per weight gives (dead channels included)."""
    x = correlated_inputs(64)
    x[:, 5] = 0.0  # a dead input channel
    acc = HessianAccumulator(64)
    acc.update(x)
    made = []

    def make(h: torch.Tensor) -> object:
        made.append(1)
        return hessian_factor(h, 0.01, act_order)

    gen = torch.Generator().manual_seed(4)
    spec = TensorQuantSpec(4, False, "group", 16)
    for rows in (24, 8, 8):
        w = torch.randn(rows, 64, generator=gen)
        shared = gptq_quantize(w, acc.derived("f", make), spec, act_order=act_order)
        alone = gptq_quantize(w, acc.hessian, spec, act_order=act_order)
        assert shared.dead_columns == alone.dead_columns == 1
        assert torch.equal(shared.weight.qdata, alone.weight.qdata)
        assert torch.equal(shared.weight.scale, alone.weight.scale)
        assert torch.equal(shared.weight.zero_point, alone.weight.zero_point)
    assert len(made) == 1
    acc.update(x[:10])  # new rows: the factor is stale and made again
    acc.derived("f", make)
    assert len(made) == 2


def test_block_size_does_not_change_the_result_much() -> None:
    """Lazy batch updates are an exact reordering of the same column sweep."""
    x = correlated_inputs(64)
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    spec = TensorQuantSpec(4, False, "channel")
    a = gptq_quantize(w, hessian, spec, block_size=64).weight.dequantize()
    b = gptq_quantize(w, hessian, spec, block_size=8).weight.dequantize()
    c = gptq_quantize(w, hessian, spec, block_size=1).weight.dequantize()
    # float reassociation can flip a rare rounding decision; nearly all codes agree
    assert (a == b).float().mean() > 0.99 and (a == c).float().mean() > 0.99


def test_dead_columns_are_zeroed_and_singular_hessians_get_more_damping() -> None:
    x = correlated_inputs(32)
    x[:, 5] = 0.0
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(8, 32)
    result = gptq_quantize(w, hessian, TensorQuantSpec(8, True, "channel"))
    assert result.dead_columns == 1
    assert torch.all(result.weight.dequantize()[:, 5] == 0)
    # a rank-one Hessian with no dampening is singular: the solve must retry, not emit NaN
    v = torch.randn(32, 1)
    rank_one = v @ v.T
    result = gptq_quantize(w, rank_one, TensorQuantSpec(4, False, "channel"), percdamp=0.0)
    assert result.damp > 0
    assert bool(torch.isfinite(result.weight.dequantize()).all())


def test_bad_inputs_are_refused() -> None:
    spec = TensorQuantSpec(4, False, "group", 32)
    with pytest.raises(ValueError, match="do not match"):
        gptq_quantize(torch.randn(4, 64), torch.eye(32), spec)
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(torch.randn(4, 48), torch.eye(48), spec)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(torch.full((4, 64), float("nan")), torch.eye(64), spec)


@pytest.fixture(scope="module")
def captured() -> Program:
    return capture(tiny_llama(layers=2))


def calibrated(captured: Program) -> Program:
    return with_token_calibration(copy.deepcopy(captured), samples=16, length=64)


def logits(program: Program, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = program(ids)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("scheme", ["w4a16", "w8a8-dynamic", "w8a8", "w4a4"])
def test_gptq_pass_is_closer_to_float_than_rtn(captured: Program, scheme: str) -> None:
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(9))
    ref = logits(captured, ids)
    errors = {}
    for pipeline in (f"linear-quant{{scheme={scheme}}}", f"gptq{{scheme={scheme}}}"):
        p = calibrated(captured)
        PassManager.parse(pipeline).run(p)
        errors[pipeline.split("{")[0]] = float((logits(p, ids) - ref).pow(2).mean())
    assert errors["gptq"] < errors["linear-quant"]
    stats = p.statistics["gptq"]
    assert (
        stats["output error (sum over linears)"] < stats["output error of RTN (sum over linears)"]
    )


def test_gptq_needs_calibration_and_checks_options() -> None:
    assert GPTQ().needs_calibration
    assert GPTQ().scheme == "w4a16"
    with pytest.raises(OptionError, match="block-size"):
        GPTQ(block_size=0)
    with pytest.raises(OptionError, match="percdamp"):
        GPTQ(percdamp=1.5)
    with pytest.raises(OptionError, match="gptq"):
        GPTQ(scheme="w8a8", group_size=64)


def test_shrunk_ranges_never_lose_to_minmax_on_their_own_objective() -> None:
    from slimc.quant.gptq import shrunk_range

    gen = torch.Generator().manual_seed(6)
    block = torch.randn(32, 64, generator=gen)
    block[:, 0] *= 6  # one outlier per row: shrinking the range pays off for most rows
    spec = TensorQuantSpec(4, False, "channel")

    def error(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        z = zp.float().unsqueeze(1)
        q = torch.clamp(torch.round(block / scale.unsqueeze(1)) + z, spec.qmin, spec.qmax)
        return ((q - z) * scale.unsqueeze(1) - block).abs().pow(2.4).sum(1)

    base = error(*shrunk_range(block, spec, steps=0))
    best = error(*shrunk_range(block, spec, steps=20))
    assert bool((best <= base).all()) and float(best.sum()) < float(base.sum())


def test_wide_inputs_are_factored_in_float32_close_to_float64(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From `FLOAT32_FACTOR_FROM_K` (a 70B model's FFN width) the factorization runs in
    float32, which must give nearly the float64 result."""
    from slimc.quant import gptq

    x = correlated_inputs(64)
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    spec = TensorQuantSpec(4, False, "group", 16)
    f64 = gptq.hessian_factor(hessian, 0.01, True)
    monkeypatch.setattr(gptq, "FLOAT32_FACTOR_FROM_K", 64)
    f32 = gptq.hessian_factor(hessian, 0.01, True)
    assert torch.equal(f64.perm, f32.perm)
    torch.testing.assert_close(f32.hinv, f64.hinv, rtol=1e-3, atol=1e-4)
    err64 = hessian_error(w, gptq_quantize(w, f64, spec).weight.dequantize(), hessian)
    err32 = hessian_error(w, gptq_quantize(w, f32, spec).weight.dequantize(), hessian)
    assert err32 == pytest.approx(err64, rel=0.02)
