"""flex-smooth-quant and flex-awq-ssz: exactness, the folded formula, the grid search, options."""

from __future__ import annotations

import copy

import pytest
import torch

import slimc.ops  # noqa: F401  (registers the ops)
from slimc.analyses.activation_stats import ActivationStats
from slimc.analyses.linear_groups import LinearGroups
from slimc.capture import capture
from slimc.pass_base import OptionError
from slimc.pass_manager import PassManager
from slimc.passes.flex_awq_ssz import FlexAWQSSZ
from slimc.passes.flex_smooth_quant import FlexSmoothQuant
from slimc.program import RunContext
from slimc.quant.qparams import quantize_weight
from slimc.quant.scheme import TensorQuantSpec
from slimc.smooth.fold import weight_column_absmax
from slimc.smooth.search import (
    TokenSampler,
    argmin_later,
    fake_quant_per_token,
    grid,
    minmax_weight,
)
from tests.models import tiny_llama


@pytest.fixture(scope="module")
def llama_program():
    program = capture(tiny_llama(layers=2))
    gen = torch.Generator().manual_seed(1)
    program.calibration = [(torch.randint(0, 128, (1, 32), generator=gen),) for _ in range(4)]
    program.context = RunContext(progress=False)
    return program


def _logits(program, ids):
    with torch.no_grad():
        out = program(ids)
    return out[0] if isinstance(out, (tuple, list)) else out


def _weights(program):
    return {k: v.clone() for k, v in program.weights.items()}


@pytest.mark.parametrize(
    "pass_",
    [
        FlexSmoothQuant(),
        FlexSmoothQuant(act_quant="per-tensor", grid_step=0.25),
        FlexAWQSSZ(),
        FlexAWQSSZ(act_quant="none", group_size=32, grid_step=0.25),
    ],
    ids=str,
)
def test_exact_and_changes_weights(llama_program, pass_):
    program = copy.deepcopy(llama_program)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    ref = _logits(program, ids)
    before = _weights(program)
    PassManager.parse([pass_]).run(program)
    out = _logits(program, ids)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    after = dict(program.weights.items())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= 8  # norms, q/k/v/o, gate/up/down of both layers
    stats = program.statistics[pass_.name]
    assert stats["smoothed norm-linear groups"] == 4
    assert 0.0 <= stats["mean alpha"] <= 1.0
    assert stats["mean relative error smoothed"] > 0
    if pass_.name == "flex-awq-ssz":  # alpha = 0 (no smoothing) is a candidate
        assert stats["mean relative error smoothed"] <= stats["mean relative error unsmoothed"]


@pytest.mark.parametrize(
    ("pass_", "stat"),
    [
        (FlexSmoothQuant(alpha=0.6, beta=0.3, enable_subgraph_type=("norm-linear",)), "absmax"),
        (FlexAWQSSZ(alpha=0.7, enable_subgraph_type=("norm-linear",)), "absmean"),
    ],
    ids=["flex-smooth-quant", "flex-awq-ssz"],
)
def test_fixed_exponents_fold_the_formula(llama_program, pass_, stat):
    program = copy.deepcopy(llama_program)
    group = LinearGroups.compute(program).in_layer_order()
    group = next(g for g in group if g.kind == "norm-linear")  # layer 0 input_layernorm -> qkv
    act = getattr(ActivationStats.compute(program)[group.input], stat)
    w = weight_column_absmax(program, group)
    alpha, beta = pass_.alpha, getattr(pass_, "beta", 0.0)
    s = (act.pow(alpha) / w.clamp(min=1e-5).pow(beta)).clamp(min=1e-5)
    norm_w = str(group.carrier.weight.target)
    expected = program.weights.get(norm_w).double() / s
    PassManager.parse([pass_]).run(program)
    torch.testing.assert_close(program.weights.get(norm_w).double(), expected, rtol=1e-6, atol=0)
    assert program.statistics[pass_.name]["mean alpha"] == pytest.approx(alpha)


# -- the search, against an independent reference ---------------------------------------------
class NormLinears(torch.nn.Module):
    """An RMSNorm read by two linears: one norm-linear group."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(64, eps=1e-6)
        self.fc1 = torch.nn.Linear(64, 48, bias=False)
        self.fc2 = torch.nn.Linear(64, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return torch.cat([self.fc1(h), self.fc2(h)], -1)


def _outlier_case(outlier: float = 40.0):
    torch.manual_seed(0)
    model = NormLinears().eval()
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(3):
        x = torch.randn(1, 16, 64, generator=gen)
        x[..., 5] *= outlier
        samples.append((x,))
    program = capture(model, samples[0])
    program.calibration = samples
    program.context = RunContext(progress=False)
    with torch.no_grad():
        xs = torch.cat([model.norm(s[0]).reshape(-1, 64) for s in samples]).double()
    w = torch.cat([model.fc1.weight, model.fc2.weight]).detach().double()
    return program, xs, w


def _ref_error(x, w, s, w_bits):
    """RMSE / RMS of int8 per-token (X/s) times int-w_bits per-channel symmetric (W*s)."""

    def fq(t, bits):
        qmax = 2 ** (bits - 1) - 1
        scale = (t.abs().amax(-1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).eps)
        return (t / scale).round().clamp(-qmax - 1, qmax) * scale

    y = x @ w.T
    y_hat = fq(x / s, 8) @ fq(w * s, w_bits).T
    return float((y_hat - y).square().mean().sqrt() / y.square().mean().sqrt())


def _ref_argmin(cands, error, best=None):
    for c in cands:
        e = error(c)
        if best is None or e <= best[1]:
            best = (c, e)
    return best


def _assert_best(chosen, best, error):
    """`chosen` is the reference's pick, or (float32 vs float64 near-tie) as good to 1e-4."""
    if chosen != best[0]:
        assert error(chosen) <= best[1] * (1 + 1e-4), (chosen, best)


def test_flex_smooth_quant_search_picks_the_least_error():
    program, x, w = _outlier_case()
    PassManager.parse([FlexSmoothQuant()]).run(program)
    stats = program.statistics["flex-smooth-quant"]
    chosen = (round(stats["mean alpha"], 9), round(stats["mean beta"], 9))
    a_max, w_max = x.abs().amax(0), w.abs().amax(0)

    def error(ab):
        s = (a_max.pow(ab[0]) / w_max.clamp(min=1e-5).pow(ab[1])).clamp(min=1e-5)
        return _ref_error(x, w, s, 8)

    steps = grid(0.05)
    stage1 = _ref_argmin([(a, round(1 - a, 9)) for a in steps], error)
    best = _ref_argmin([(stage1[0][0], b) for b in steps], error, stage1)
    _assert_best(chosen, best, error)
    assert chosen[0] > 0  # the outlier channel is migrated into the weights
    assert error(chosen) < error((0.0, 0.0))  # better than no smoothing
    assert stats["mean relative error smoothed"] == pytest.approx(error(chosen), rel=1e-3)


def test_flex_awq_ssz_search_picks_the_least_error():
    program, x, w = _outlier_case()
    PassManager.parse([FlexAWQSSZ()]).run(program)
    alpha = round(program.statistics["flex-awq-ssz"]["mean alpha"], 9)
    a_mean = x.abs().mean(0)

    def error(a):
        return _ref_error(x, w, a_mean.pow(a).clamp(min=1e-5), 4)

    best = _ref_argmin(grid(0.05), error)
    _assert_best(alpha, best, error)
    assert alpha > 0


# -- helpers and options ----------------------------------------------------------------------
def test_grid_and_ties():
    assert grid(0.05)[:3] == [0.0, 0.05, 0.1] and grid(0.05)[-1] == 1.0 and len(grid(0.05)) == 21
    assert grid(0.3) == [0.0, 0.3, 0.6, 0.9, 1.0]
    assert grid(1.0) == [0.0, 1.0]
    errs = {"a": 2.0, "b": 1.0, "c": 1.0, "d": 3.0}
    assert argmin_later("abcd", errs.__getitem__) == ("c", 1.0)
    assert argmin_later("d", errs.__getitem__, ("b", 1.0)) == ("b", 1.0)


def test_token_sampler_spreads_evenly():
    sampler = TokenSampler(10, 4, seed=0)
    assert [sampler.quota(i) for i in range(4)] == [3, 3, 2, 2]
    idx = sampler.indices(0, 32)
    assert idx is not None and len(idx) == 3 and bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(idx, TokenSampler(10, 4, seed=0).indices(0, 32))
    assert sampler.indices(3, 2) is None  # short sample: every token
    assert TokenSampler(-1, 4).indices(0, 32) is None


def test_fake_quant_per_token_matches_the_op():
    x = torch.randn(5, 32) * torch.linspace(0.1, 10, 5)[:, None]
    q, scale = torch.ops.slimc.quantize_per_token(x)
    torch.testing.assert_close(fake_quant_per_token(x), q.float() * scale, rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec",
    [
        TensorQuantSpec(8, True, "channel"),
        TensorQuantSpec(4, True, "channel"),
        TensorQuantSpec(4, False, "group", 16),
    ],
    ids=str,
)
def test_minmax_weight_matches_quantize_weight(spec):
    w = torch.randn(24, 64) * torch.linspace(0.01, 3, 64)
    torch.testing.assert_close(
        minmax_weight(w, spec), quantize_weight(w, spec).dequantize(), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("cls", "options", "option_name"),
    [
        (FlexSmoothQuant, {"grid-step": ("0",)}, "grid-step"),
        (FlexSmoothQuant, {"grid-step": ("1.5",)}, "grid-step"),
        (FlexSmoothQuant, {"grid-step": ("-0.1",)}, "grid-step"),
        (FlexSmoothQuant, {"alpha": ("1.2",)}, "alpha"),
        (FlexSmoothQuant, {"beta": ("-0.5",)}, "beta"),
        (FlexSmoothQuant, {"max-tokens": ("0",)}, "max-tokens"),
        (FlexSmoothQuant, {"weight-bits": ("3",)}, "weight-bits"),
        (FlexSmoothQuant, {"act-quant": ("none",)}, "act-quant"),
        (FlexAWQSSZ, {"grid-step": ("0",)}, "grid-step"),
        (FlexAWQSSZ, {"group-size": ("0",)}, "group-size"),
        (FlexAWQSSZ, {"weight-bits": ("2",)}, "weight-bits"),
        (FlexAWQSSZ, {"weight-method": ("gptq",)}, "weight-method"),
    ],
)
def test_option_validation(cls, options, option_name):
    with pytest.raises(OptionError, match=f"'{option_name}'"):
        cls.from_options(options)


def test_options_round_trip():
    p = FlexSmoothQuant.from_options({"alpha": ("0.5",), "beta": ("none",), "max-tokens": ("-1",)})
    assert p.alpha == 0.5 and p.beta is None and p.max_tokens == -1
    assert str(p) == "flex-smooth-quant{alpha=0.5 max-tokens=-1}"
    assert FlexAWQSSZ.from_options({"act-quant": ("none",)}).act_quant == "none"
