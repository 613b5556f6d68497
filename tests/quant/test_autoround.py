"""AutoRound: learned rounding against the codes it writes, SignSGD on a block, the pass, packing."""

from __future__ import annotations

import copy

import pytest
import torch

from slimc.calibration import pack_token_samples
from slimc.capture import capture
from slimc.pass_base import OptionError
from slimc.pass_manager import PassManager
from slimc.passes.autoround import AutoRound
from slimc.program import Program
from slimc.quant.autoround import (
    RANGE_MIN,
    V_BOUND,
    RoundingParams,
    TuneConfig,
    WeightQuantizer,
    fake_quantize,
    quantize_rounded,
    tune_block,
)
from slimc.quant.qparams import quantize_weight
from slimc.quant.scheme import TensorQuantSpec
from tests.models import tiny_llama, with_token_calibration

SPECS = [
    TensorQuantSpec(4, False, "channel"),
    TensorQuantSpec(4, True, "channel"),
    TensorQuantSpec(4, False, "group", 16),
    TensorQuantSpec(8, True, "channel"),
]
SPEC_IDS = [f"{s.bits}b-{s.granularity}-sym{s.symmetric}" for s in SPECS]


def random_params(q: WeightQuantizer, seed: int = 0) -> RoundingParams:
    gen = torch.Generator().manual_seed(seed)
    p = q.init_params(minmax=True)
    assert p.alpha is not None and p.beta is not None
    p.v.uniform_(-V_BOUND, V_BOUND, generator=gen)
    p.alpha.uniform_(RANGE_MIN, 1.0, generator=gen)
    p.beta.uniform_(RANGE_MIN, 1.0, generator=gen)
    return p


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_initial_params_are_minmax_rounding(spec: TensorQuantSpec) -> None:
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    for minmax in (True, False):
        q = WeightQuantizer(w, spec)
        ours, rtn = q.quantize(q.init_params(minmax)), quantize_weight(w, spec)
        assert torch.equal(ours.qdata, rtn.qdata) and torch.equal(ours.scale, rtn.scale)
        assert (ours.zero_point is None) == (rtn.zero_point is None) == spec.symmetric
        if rtn.zero_point is not None:
            assert torch.equal(ours.zero_point, rtn.zero_point)
        assert torch.equal(q.fake_quantize(q.init_params(minmax)), rtn.dequantize())


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_written_codes_are_what_training_saw(spec: TensorQuantSpec) -> None:
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    w[3] = 0.0  # an all-zero channel: the scale floor must not produce NaN
    p = random_params(WeightQuantizer(w, spec))
    qw = quantize_rounded(w, spec, p)
    assert qw.qdata.dtype == torch.int8 and qw.qdata.shape == w.shape
    assert int(qw.qdata.min()) >= spec.qmin and int(qw.qdata.max()) <= spec.qmax
    if qw.zero_point is not None:
        assert int(qw.zero_point.min()) >= spec.qmin and int(qw.zero_point.max()) <= spec.qmax
    torch.testing.assert_close(fake_quantize(w, spec, p), qw.dequantize(), rtol=0, atol=1e-7)
    # the offsets change rounding decisions, by at most one code
    rtn = quantize_weight(w, spec).qdata.int()
    unclipped = quantize_rounded(w, spec, RoundingParams(p.v)).qdata.int()
    assert bool((unclipped - rtn).abs().le(1).all()) and bool((unclipped != rtn).any())


def test_gradients_reach_offsets_and_range_factors() -> None:
    spec = TensorQuantSpec(4, False, "group", 16)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    p = WeightQuantizer(w, spec).init_params(minmax=True).requires_grad_()
    (fake_quantize(w, spec, p) - w * 1.1).pow(2).sum().backward()
    for t in p.tensors():
        assert t.grad is not None and bool(t.grad.abs().gt(0).any())


def linear_problem(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 64, generator=gen) * 0.1
    mix = torch.randn(64, 64, generator=gen) * 0.3
    xs = [torch.randn(48, 64, generator=gen) @ mix * torch.linspace(0.2, 3, 64) for _ in range(6)]
    return w, xs


@pytest.mark.parametrize("minmax", [True, False])
def test_signsgd_lowers_the_output_loss_and_keeps_params_in_range(minmax: bool) -> None:
    w, xs = linear_problem()
    spec = TensorQuantSpec(4, False, "channel")

    def loss_fn(i: int, ws: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(xs[i] @ ws["w"].T, xs[i] @ w.T)

    cfg = TuneConfig(iters=200, lr=1 / 200, minmax=minmax, batch_size=len(xs))
    result = tune_block({"w": (w, spec)}, len(xs), loss_fn, cfg)
    assert not result.kept_rtn and result.loss < 0.9 * result.rtn_loss
    p = result.params["w"]
    assert not p.v.requires_grad and p.v.device.type == "cpu"
    assert float(p.v.abs().max()) <= V_BOUND and bool(p.v.ne(0).any())
    if minmax:
        assert p.alpha is not None and p.beta is not None
        for t in (p.alpha, p.beta):
            assert float(t.min()) >= RANGE_MIN and float(t.max()) <= 1.0
    else:
        assert p.alpha is None and p.beta is None
    assert w.grad is None  # the float weight is left alone


def test_zero_iterations_keep_plain_rounding() -> None:
    w, xs = linear_problem()
    spec = TensorQuantSpec(4, True, "channel")

    def loss_fn(i: int, ws: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(xs[i] @ ws["w"].T, xs[i] @ w.T)

    result = tune_block({"w": (w, spec)}, len(xs), loss_fn, TuneConfig(iters=0, lr=1.0))
    assert result.kept_rtn and result.loss == result.rtn_loss
    assert torch.equal(
        quantize_rounded(w, spec, result.params["w"]).qdata, quantize_weight(w, spec).qdata
    )


# -- packing token-id samples ----------------------------------------------------------------
def test_packing_joins_documents_in_order() -> None:
    docs = [torch.arange(0, 3), torch.arange(3, 8), torch.arange(8, 12), torch.arange(12, 19)]
    packed = pack_token_samples([(d.unsqueeze(0),) for d in docs], seqlen=4)
    assert [s[0].shape for s in packed] == [torch.Size([1, 4])] * 4 + [torch.Size([1, 3])]
    assert torch.equal(torch.cat([s[0].reshape(-1) for s in packed]), torch.arange(19))
    assert packed[0][0].dtype == torch.long
    # a remainder shorter than min_len is dropped, unless it is all there is
    assert len(pack_token_samples([(d,) for d in docs], seqlen=4, min_len=4)) == 4
    only = pack_token_samples([(torch.arange(3).unsqueeze(0),)], seqlen=8)
    assert len(only) == 1 and only[0][0].shape == (1, 3)
    # [B, L] samples contribute their rows one after another; bare tensors are accepted
    rows = pack_token_samples([torch.arange(6).reshape(2, 3)], seqlen=6)
    assert torch.equal(rows[0][0], torch.arange(6).unsqueeze(0))


def test_packing_refuses_what_is_not_token_ids() -> None:
    with pytest.raises(ValueError, match="not an integer token-id tensor"):
        pack_token_samples([(torch.randn(1, 8),)], seqlen=4)
    with pytest.raises(ValueError, match="not a single token-id tensor"):
        pack_token_samples([(torch.arange(4), torch.arange(4))], seqlen=4)
    with pytest.raises(ValueError, match="seqlen"):
        pack_token_samples([(torch.arange(4),)], seqlen=0)
    with pytest.raises(ValueError, match="no calibration samples"):
        pack_token_samples([], seqlen=4)


# -- the pass ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captured() -> Program:
    return capture(tiny_llama(layers=2))


def calibrated(captured: Program) -> Program:
    return with_token_calibration(copy.deepcopy(captured), samples=16, length=64)


def logits(program: Program, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = program(ids)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("scheme", ["w4a16", "w4a4"])
def test_autoround_is_closer_to_float_than_rtn(captured: Program, scheme: str) -> None:
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(9))
    ref = logits(captured, ids)
    errors, programs = {}, {}
    # 30 iterations were too few for transformers 5.25's initialisation of this model (4% below
    # RTN); at 100 (AutoRound's light default is 50, full 200) it is 31% below on w4a16
    for pipeline in (
        f"linear-quant{{scheme={scheme}}}",
        f"autoround{{scheme={scheme} iters=100 seqlen=128 batch-size=8}}",
    ):
        p = calibrated(captured)
        PassManager.parse(pipeline).run(p)
        name = pipeline.split("{")[0]
        errors[name], programs[name] = float((logits(p, ids) - ref).pow(2).mean()), p
    assert errors["autoround"] < 0.9 * errors["linear-quant"]
    p = programs["autoround"]
    stats = p.statistics["autoround"]
    assert (
        stats["layer output loss (sum over layers)"]
        < stats["layer output loss of RTN (sum over layers)"]
    )
    assert stats[f"quantized linears ({scheme})"] == 14
    codes = [t for name, t in p.weights.items() if name.endswith(".weight_q")]
    assert len(codes) == 14
    for q in codes:
        assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7


def test_second_autoround_trains_through_linears_the_first_quantized(captured: Program) -> None:
    """LAOS runs AutoRound twice: the second pass's gradients cross the activation
    quantize/dequantize pairs the first left in the graph (straight-through), and it still
    lowers its layer loss below RTN's."""
    p = calibrated(captured)
    PassManager.parse(
        "autoround{scheme=w8a8-dynamic only=*down_proj iters=4 seqlen=0},"
        "autoround{scheme=w4a4 iters=10 seqlen=0}"
    ).run(p)
    stats = p.statistics["autoround"]
    assert stats["quantized linears (w4a4)"] == 12
    assert (
        stats["layer output loss (sum over layers)"]
        < stats["layer output loss of RTN (sum over layers)"]
    )
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(logits(p, ids)).all()


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_zero_iterations_on_the_same_samples_is_linear_quant(
    captured: Program, scheme: str
) -> None:
    """Static ranges are observed as linear-quant observes them, and V = 0 is plain rounding."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(5))
    outs = []
    for pipeline in (
        f"linear-quant{{scheme={scheme}}}",
        f"autoround{{scheme={scheme} iters=0 seqlen=0}}",
    ):
        p = calibrated(captured)
        PassManager.parse(pipeline).run(p)
        outs.append(logits(p, ids))
    assert torch.equal(outs[0], outs[1])


def test_training_samples_are_packed_when_they_are_token_ids(captured: Program) -> None:
    p = calibrated(captured)  # 16 x 64 tokens
    packed = AutoRound(seqlen=120).training_samples(p)
    assert [s[0].shape[1] for s in packed] == [120] * 8 + [64]  # 64 >= 120 // 2: kept
    assert len(AutoRound(seqlen=100).training_samples(p)) == 10  # 24 left over: dropped
    assert len(AutoRound(seqlen=100, samples=3).training_samples(p)) == 3
    assert len(AutoRound(seqlen=0).training_samples(p)) == 16
    p.calibration = [(torch.randn(2, 8, 64),)]  # not token ids: used as given
    assert AutoRound().training_samples(p)[0][0].shape == (2, 8, 64)


def test_autoround_needs_calibration_and_checks_options() -> None:
    ar = AutoRound()
    assert ar.needs_calibration and ar.scheme == "w4a16" and ar.iters == 200
    assert ar.tune_config().lr == pytest.approx(1 / 200)
    assert AutoRound(iters=10, lr=0.3).tune_config().lr == 0.3
    for bad, match in [
        ({"iters": -1}, "iters"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch-size"),
        ({"seqlen": -1}, "seqlen"),
        ({"samples": -2}, "samples"),
        ({"device": "warp-drive"}, "device"),
        ({"scheme": "w4a4", "group_size": 64}, "autoround"),
    ]:
        with pytest.raises(OptionError, match=match):
            AutoRound(**bad)
    pm = PassManager.parse("autoround{iters=5 minmax-tuning=false lr=0.1 device=cpu}")
    step = pm.steps[0]
    assert isinstance(step, AutoRound) and not step.minmax_tuning and step.lr == 0.1
