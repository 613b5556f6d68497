"""MinMax / histogram observers and the shared qparam / weight-quantization math."""

from __future__ import annotations

import pytest
import torch

import slimc.ops  # noqa: F401  (registers the ops)
from slimc.quant.observers import HistogramObserver, MinMaxObserver
from slimc.quant.qparams import calculate_qparams, quantize_weight
from slimc.quant.scheme import TensorQuantSpec

ops = torch.ops.slimc
PER_TENSOR_ASYM = TensorQuantSpec(8, False, "tensor")
PER_TENSOR_SYM = TensorQuantSpec(8, True, "tensor")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _quant_mse(x: torch.Tensor, scale, zp, spec: TensorQuantSpec) -> float:
    block = [-1] * x.dim()
    q = ops.quantize_affine(x, block, scale, zp, spec.qmin, spec.qmax, torch.int8)
    xd = ops.dequantize_affine(q, block, scale, zp, spec.qmin, spec.qmax, torch.float32)
    return float(((xd - x) ** 2).mean())


def test_minmax_per_tensor_running_max():
    obs = MinMaxObserver(PER_TENSOR_ASYM)
    obs.update(torch.tensor([[-1.0, 2.0], [0.5, 0.0]]))
    obs.update(torch.tensor([-3.0, 1.0]))
    assert float(obs.min_val) == -3.0 and float(obs.max_val) == 2.0
    scale, zp = obs.calculate_qparams()
    torch.testing.assert_close(scale, torch.tensor(5.0 / 255))
    assert int(zp) == -128 + round(3.0 / (5.0 / 255))
    assert -128 <= int(zp) <= 127


def test_minmax_mean_aggregation():
    obs = MinMaxObserver(PER_TENSOR_SYM, aggregation="mean")
    obs.update(torch.tensor([-1.0, 2.0]))
    obs.update(torch.tensor([-3.0, 4.0]))
    assert float(obs.min_val) == -2.0 and float(obs.max_val) == 3.0
    scale, zp = obs.calculate_qparams()
    torch.testing.assert_close(scale, torch.tensor(3.0 / 127))
    assert int(zp) == 0


def test_minmax_per_channel():
    obs = MinMaxObserver(TensorQuantSpec(8, False, "channel"))
    x = torch.randn(4, 6, 8)
    obs.update(x)
    obs.update(x * 2)
    torch.testing.assert_close(obs.min_val, torch.minimum(x, 2 * x).amin(dim=(0, 1)))
    torch.testing.assert_close(obs.max_val, torch.maximum(x, 2 * x).amax(dim=(0, 1)))
    scale, zp = obs.calculate_qparams()
    assert scale.shape == (8,) and zp.shape == (8,) and zp.dtype == torch.int32
    assert int(zp.min()) >= -128 and int(zp.max()) <= 127
    with pytest.raises(ValueError, match="channel count"):
        obs.update(torch.randn(3, 5))


def test_asym_zero_point_range_for_one_sided_data():
    for lo, hi in [(0.5, 3.0), (-3.0, -0.5), (-1e-3, 100.0), (-100.0, 1e-3)]:
        scale, zp = calculate_qparams(torch.tensor(lo), torch.tensor(hi), PER_TENSOR_ASYM)
        assert -128 <= int(zp) <= 127
        # zero stays exactly representable
        q0 = ops.quantize_affine(torch.zeros(1), [-1], scale, zp, -128, 127, torch.int8)
        assert float(ops.dequantize_affine(q0, [-1], scale, zp, -128, 127, torch.float32)) == 0.0


@pytest.mark.parametrize("cls", [MinMaxObserver, HistogramObserver])
def test_observer_errors(cls):
    obs = cls(PER_TENSOR_ASYM)
    with pytest.raises(ValueError, match="no data observed"):
        obs.calculate_qparams()
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="NaN or inf"):
            obs.update(torch.tensor([1.0, bad]))


def test_histogram_clips_outliers():
    data = torch.randn(4, 250_000)
    data[1, 7], data[2, 99], data[3, 5] = -50.0, 60.0, 45.0
    hist, minmax = HistogramObserver(PER_TENSOR_ASYM), MinMaxObserver(PER_TENSOR_ASYM)
    for batch in data:  # range widens across batches: exercises re-binning
        hist.update(batch)
        minmax.update(batch)
    assert float(hist.min_val) == -50.0 and float(hist.max_val) == 60.0
    assert hist.histogram.sum() == data.numel()
    clip_min, clip_max = hist.clip_range()
    assert -50.0 < clip_min < -2.0 and 2.0 < clip_max < 60.0
    bulk = data[data.abs() < 10]
    mse_hist = _quant_mse(bulk, *hist.calculate_qparams(), PER_TENSOR_ASYM)
    mse_minmax = _quant_mse(bulk, *minmax.calculate_qparams(), PER_TENSOR_ASYM)
    assert mse_hist < mse_minmax / 10


def test_histogram_matches_torch_ao_search():
    """One batch (torch.ao re-bins nothing): both searches land on the same clip range within
    two of torch.ao's bins."""
    from torch.ao.quantization.observer import HistogramObserver as TorchHistogram

    torch.manual_seed(0)
    x = torch.cat([torch.randn(3000), torch.randn(5000) * 2 + 1, torch.rand(200) * 12])
    ours = HistogramObserver(PER_TENSOR_ASYM)
    ref = TorchHistogram(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    ours.update(x)
    ref(x)
    assert float(ours.histogram.sum()) == float(ref.histogram.sum()) == x.numel()
    ref_min, ref_max = ref._non_linear_param_search()
    clip_min, clip_max = ours.clip_range()
    ref_width = float(ref.max_val - ref.min_val) / ref.bins
    assert clip_min == pytest.approx(float(ref_min), abs=2 * ref_width)
    assert clip_max == pytest.approx(float(ref_max), abs=2 * ref_width)
    assert clip_max - clip_min < float(ours.max_val - ours.min_val)


def _histogram_of(batches):
    obs = HistogramObserver(PER_TENSOR_ASYM, bins=256)
    for batch in batches:
        obs.update(batch)
    return obs


def test_histogram_is_independent_of_batch_order():
    """The grid is a function of the overall range, and coarsening merges bins exactly, so any
    order of the batches gives the same histogram and clip range, bit for bit."""
    torch.manual_seed(1)
    batches = [
        torch.full((7,), 0.25),  # constant first: the finest grid
        torch.randn(500) * 1e-3,
        torch.randn(2000),
        torch.randn(300) * 40 + 5,  # widens past the grid several times
        torch.rand(100) * -90,
    ]
    want = _histogram_of(batches)
    whole = _histogram_of([torch.cat(batches)])
    for order in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3], [1, 3, 0, 2, 4]):
        got = _histogram_of([batches[i] for i in order])
        assert torch.equal(got.histogram, want.histogram)
        assert (got.exponent, got.first) == (want.exponent, want.first)
        assert got.clip_range() == want.clip_range()
    assert torch.equal(whole.histogram, want.histogram)
    assert float(want.histogram.sum()) == sum(b.numel() for b in batches)
    assert want.bins // 2 < want.histogram.numel() <= want.bins  # the grid is as fine as fits
    lo, hi = want.clip_range()
    assert float(want.min_val) <= lo < hi <= float(want.max_val)


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0, 1e-35, 1e30])
def test_histogram_constant_input(value):
    for spec in (PER_TENSOR_ASYM, PER_TENSOR_SYM):
        obs = HistogramObserver(spec)
        obs.update(torch.full((100,), value))
        obs.update(torch.full((10,), value))
        scale, zp = obs.calculate_qparams()
        assert torch.isfinite(scale) and float(scale) > 0
        assert spec.qmin <= int(zp) <= spec.qmax
        obs.update(torch.tensor([value - 1.0, value + 1.0]))  # widen from a zero-width range
        assert obs.histogram.sum() == 112
        scale, _ = obs.calculate_qparams()
        assert torch.isfinite(scale)


def test_histogram_rejects_non_tensor_granularity():
    with pytest.raises(ValueError, match="per tensor"):
        HistogramObserver(TensorQuantSpec(8, True, "channel"))


@pytest.mark.parametrize(
    "spec",
    [
        TensorQuantSpec(8, True, "channel"),
        TensorQuantSpec(8, False, "group", 16),
        TensorQuantSpec(4, False, "group", 16),
        TensorQuantSpec(4, True, "channel"),
    ],
)
def test_quantize_weight_matches_ops(spec):
    w = torch.randn(24, 48)
    qw = quantize_weight(w, spec)
    groups = 1 if spec.granularity == "channel" else 48 // spec.group_size
    assert qw.qdata.dtype == torch.int8 and qw.qdata.shape == (24, 48)
    assert qw.scale.shape == (24, groups) and qw.scale.dtype == torch.float32
    assert (qw.zero_point is None) == spec.symmetric
    block = spec.block_size(w.shape)
    scale, zp = ops.choose_qparams_affine(w, block, spec.qmin, spec.qmax, spec.symmetric)
    torch.testing.assert_close(qw.scale, scale)
    zp_arg = None if spec.symmetric else zp
    q = ops.quantize_affine(w, block, scale, zp_arg, spec.qmin, spec.qmax, torch.int8)
    assert torch.equal(qw.qdata, q)
    half_step = qw.scale.repeat_interleave(48 // groups, 1) / 2
    assert torch.all((qw.dequantize() - w).abs() <= half_step + 1e-6)


def test_quantize_weight_bad_group():
    with pytest.raises(ValueError, match="group_size=20"):
        quantize_weight(torch.randn(8, 48), TensorQuantSpec(4, False, "group", 20))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_per_channel_observer_finds_one_bad_value_among_many(bad):
    obs = MinMaxObserver(TensorQuantSpec(bits=8, symmetric=True, granularity="channel"))
    batch = torch.randn(300, 16)
    batch[211, 9] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        obs.update(batch)
