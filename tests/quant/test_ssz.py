"""SSZ: the least-squares range refit never loses to MinMax, and the `ssz` pass."""

from __future__ import annotations

import copy

import pytest
import torch

from slimc.capture import capture
from slimc.pass_base import OptionError
from slimc.pass_manager import PassManager
from slimc.passes.ssz import SSZ
from slimc.program import RunContext
from slimc.quant.qparams import quantize_weight
from slimc.quant.scheme import TensorQuantSpec
from slimc.quant.ssz import ssz_quantize_weight
from slimc.smooth.search import WEIGHT_METHODS
from tests.models import tiny_llama

SPECS = [
    TensorQuantSpec(4, False, "channel"),
    TensorQuantSpec(4, True, "channel"),
    TensorQuantSpec(4, False, "group", 16),
    TensorQuantSpec(4, True, "group", 16),
    TensorQuantSpec(8, True, "channel"),
]


def heavy_tailed(n: int = 32, k: int = 128, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, :3] *= 10  # outlier input channels stretch the MinMax range
    return w


def block_errors(w: torch.Tensor, w_hat: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    return (w_hat - w).pow(2).reshape(n, k // group, group).sum(-1)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-sym{s.symmetric}")
def test_no_block_is_worse_than_minmax_and_the_total_is_better(spec: TensorQuantSpec) -> None:
    w = heavy_tailed()
    group = spec.group_size if spec.granularity == "group" else w.shape[1]
    minmax = quantize_weight(w, spec)
    ssz = ssz_quantize_weight(w, spec)
    assert ssz.qdata.dtype == torch.int8
    assert int(ssz.qdata.min()) >= spec.qmin and int(ssz.qdata.max()) <= spec.qmax
    assert ssz.scale.shape == minmax.scale.shape and bool((ssz.scale > 0).all())
    assert (ssz.zero_point is None) == spec.symmetric
    ours = block_errors(w, ssz.dequantize(), group)
    base = block_errors(w, minmax.dequantize(), group)
    assert bool((ours <= base * (1 + 1e-5) + 1e-12).all())
    assert float(ours.sum()) < float(base.sum())


def test_zero_iterations_is_minmax_and_constant_rows_survive() -> None:
    w = heavy_tailed()
    w[4] = 0.25  # a constant channel: the refit is degenerate there
    spec = TensorQuantSpec(4, False, "channel")
    torch.testing.assert_close(
        ssz_quantize_weight(w, spec, iters=0).dequantize(), quantize_weight(w, spec).dequantize()
    )
    out = ssz_quantize_weight(w, spec).dequantize()
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out[4], w[4], atol=1e-6, rtol=0)


def test_bad_weights_are_refused() -> None:
    spec = TensorQuantSpec(4, False, "group", 16)
    with pytest.raises(ValueError, match="does not divide"):
        ssz_quantize_weight(torch.randn(4, 40), spec)
    with pytest.raises(ValueError, match="NaN"):
        ssz_quantize_weight(torch.full((4, 32), float("inf")), spec)
    with pytest.raises(ValueError, match="2-D"):
        ssz_quantize_weight(torch.randn(32), spec)


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: f"{s.granularity}-sym{s.symmetric}")
def test_importance_weighted_fit_never_loses_to_minmax_on_its_own_measure(
    spec: TensorQuantSpec,
) -> None:
    w = heavy_tailed()
    group = spec.group_size if spec.granularity == "group" else w.shape[1]
    h = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3)) ** 4
    weighted = ssz_quantize_weight(w, spec, importance=h)
    plain = ssz_quantize_weight(w, spec)
    minmax = quantize_weight(w, spec).dequantize()
    ours = block_errors(w * h.sqrt(), weighted.dequantize() * h.sqrt(), group)
    base = block_errors(w * h.sqrt(), minmax * h.sqrt(), group)
    assert bool((ours <= base * (1 + 1e-5) + 1e-12).all())
    # on the weighted measure the weighted fit is at least as good as the plain one
    other = block_errors(w * h.sqrt(), plain.dequantize() * h.sqrt(), group)
    assert float(ours.sum()) <= float(other.sum()) * (1 + 1e-6)
    torch.testing.assert_close(  # uniform importance is the plain fit
        ssz_quantize_weight(w, spec, importance=torch.full((w.shape[1],), 7.0)).dequantize(),
        plain.dequantize(),
    )
    with pytest.raises(ValueError, match="importance"):
        ssz_quantize_weight(w, spec, importance=torch.ones(3))


def test_ssz_pass_weighs_by_calibration_inputs() -> None:
    captured = capture(tiny_llama(layers=2))
    gen = torch.Generator().manual_seed(1)
    captured.calibration = [(torch.randint(0, 128, (1, 32), generator=gen),) for _ in range(4)]
    captured.context = RunContext(progress=False)
    PassManager.parse("ssz{scheme=w4a16}").run(captured)
    stats = captured.statistics["ssz"]
    ours = stats["E[x^2]-weighted weight error (sum over linears)"]
    assert ours < stats["E[x^2]-weighted weight error of MinMax (sum over linears)"]


def test_flex_awq_ssz_can_search_against_ssz() -> None:
    w = heavy_tailed()
    spec = TensorQuantSpec(4, True, "channel")
    torch.testing.assert_close(
        WEIGHT_METHODS["ssz"](w, spec), ssz_quantize_weight(w, spec).dequantize()
    )


def test_ssz_pass_lowers_the_weight_error() -> None:
    captured = capture(tiny_llama(layers=2))
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = captured(ids)[0]
    p = copy.deepcopy(captured)
    p.context = RunContext(progress=False)
    PassManager.parse("ssz{scheme=w4a16 group-size=32 weighting=none}").run(p)
    stats = p.statistics["ssz"]
    ours = stats["weight squared error (sum over linears)"]
    assert ours < stats["weight squared error of MinMax (sum over linears)"]
    with torch.inference_mode():
        out = p(ids)[0]
    assert bool(torch.isfinite(out).all())
    assert float((out - ref).pow(2).mean()) < 0.05 * float(ref.pow(2).mean())
    assert not SSZ(weighting="none").needs_calibration
    assert SSZ().needs_calibration
    with pytest.raises(OptionError, match="iters"):
        SSZ(iters=-1)
