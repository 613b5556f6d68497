"""Smoothing is exact: logits unchanged in fp32, statistics updated analytically, formulas as documented."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from slimc.analyses.activation_stats import ActivationStats
from slimc.analyses.linear_groups import LinearGroup, LinearGroups
from slimc.analysis import AnalysisManager
from slimc.pass_manager import PassManager
from slimc.program import Program, RunContext, node_loc
from slimc.smooth.fold import fold_scale, weight_column_absmax
from tests.models import captured, float_logits, rel_err, with_token_calibration

MODELS = ("llama", "gemma2", "opt")
TOLERANCE = 1e-4  # max |out - ref| / max |ref|, fp32


@pytest.fixture
def programs() -> Callable[[str], Program]:
    """`programs(name)`: a fresh copy of the captured tiny model, with 4 calibration samples."""

    def get(name: str) -> Program:
        return with_token_calibration(captured(name), samples=4, length=24)

    return get


def eval_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def snapshot(program: Program) -> dict[str, torch.Tensor]:
    return {name: w.detach().clone() for name, w in program.weights.items()}


def assert_stats_close(updated: ActivationStats, fresh: ActivationStats) -> None:
    assert set(updated.stats) == set(fresh.stats)
    for node, want in fresh.stats.items():
        got = updated[node]
        assert got.tokens == want.tokens
        for field in ("absmax", "absmean", "min", "max"):
            a, b = getattr(got, field), getattr(want, field)
            scale = float(b.abs().max())
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * scale), (node.name, field)


# -- the passes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(
    ("pipeline", "kinds"),
    [
        ("smooth-quant", {"norm-linear"}),
        ("iter-smooth", {"norm-linear", "ov", "up-down"}),
    ],
)
def test_pass_keeps_logits_and_updates_stats(programs, model: str, pipeline: str, kinds) -> None:
    program = programs(model)
    ids = eval_ids()
    ref = float_logits(program, ids)
    before = snapshot(program)
    am = AnalysisManager(program)
    PassManager.parse(pipeline).run(program, am)

    assert rel_err(float_logits(program, ids), ref) < TOLERANCE

    counts = program.statistics[pipeline]
    groups = am.get(LinearGroups)
    expected_kinds = kinds & {g.kind for g in groups.groups}
    assert {k.split()[1] for k in counts} == expected_kinds
    for kind in expected_kinds:
        n = sum(
            g.kind == kind for g in groups.groups if "lm_head" not in str(node_loc(g.targets[0]))
        )
        assert counts[f"smoothed {kind} groups"] == n

    after = snapshot(program)
    changed = {name for name, w in after.items() if not torch.equal(w, before[name])}
    for g in groups.groups:
        if g.kind not in kinds:
            continue
        for t in g.targets:
            assert str(t.args[1].target) in changed, (g.name, t.args[1].target)
        if g.carrier is not None:
            assert str(g.carrier.weight.target) in changed
            if g.carrier.bias is not None:
                assert str(g.carrier.bias.target) in changed
        else:
            assert str(g.producer.args[1].target) in changed  # type: ignore[union-attr]

    # the statistics the pass kept valid (divided analytically) match a recomputation
    updated = am.cached(ActivationStats)
    assert updated is not None
    assert_stats_close(updated, ActivationStats.compute(program))


@pytest.mark.parametrize("model", list(MODELS))
def test_random_scales_fold_exactly_into_every_group(programs, model: str) -> None:
    """Every discovered group, every kind: a log-uniform scale in [0.1, 10] changes nothing."""
    program = programs(model)
    ids = eval_ids()
    ref = float_logits(program, ids)
    groups = LinearGroups.compute(program).in_layer_order()
    assert groups
    gen = torch.Generator().manual_seed(3)
    for g in groups:
        s = torch.exp(
            (torch.rand(g.source_channels(), generator=gen, dtype=torch.float64) * 2 - 1) * 2.3
        )
        fold_scale(program, g, s)
    assert rel_err(float_logits(program, ids), ref) < TOLERANCE


# -- the documented formula ------------------------------------------------------------------------
def _first(groups: LinearGroups, kind: str) -> LinearGroup:
    return next(g for g in groups.groups if g.kind == kind)


@pytest.mark.parametrize("model", ["llama", "gemma2"])
def test_iter_smooth_norm_linear_formula(programs, model: str) -> None:
    """`s = max(A^a / W^(1-a), scale-min)`: the norm weight (plus its offset) is divided by s."""
    program = programs(model)
    alpha = 0.7
    g = _first(LinearGroups.compute(program), "norm-linear")
    assert g.carrier is not None
    act = ActivationStats.compute(program)[g.input].absmax.clone()
    weight = weight_column_absmax(program, g)
    s = (act.pow(alpha) / weight.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
    assert not torch.allclose(s, torch.ones_like(s), atol=1e-2)  # a real scale, not identity
    norm_name = str(g.carrier.weight.target)
    norm_before = program.weights.get(norm_name).double() + g.carrier.offset
    targets_before = [program.weights.get(str(t.args[1].target)).double() for t in g.targets]

    PassManager.parse(f"iter-smooth{{alpha={alpha} enable-subgraph-type=norm-linear}}").run(program)

    norm_after = program.weights.get(norm_name).double() + g.carrier.offset
    assert torch.allclose(norm_after / norm_before, 1 / s, rtol=1e-5)
    for t, w in zip(g.targets, targets_before, strict=True):
        got = program.weights.get(str(t.args[1].target)).double()
        assert torch.allclose(got, w * s, rtol=1e-5, atol=1e-8)


def test_iter_smooth_ov_reduces_over_grouped_query_heads(programs) -> None:
    """ov: one scale per v_proj row, the max (ov-reduce=max) over the o_proj columns it feeds."""
    program = programs("llama")
    alpha = 0.9
    g = _first(LinearGroups.compute(program), "ov")
    assert g.channel_map is not None and g.producer is not None
    act = ActivationStats.compute(program)[g.input].absmax.clone()
    per_input = act.pow(alpha) / weight_column_absmax(program, g).pow(1 - alpha)
    s = torch.zeros(g.source_channels(), dtype=torch.float64)
    for j, c in enumerate(g.channel_map.tolist()):
        s[c] = max(s[c], per_input[j])
    v_name, o_name = str(g.producer.args[1].target), str(g.targets[0].args[1].target)
    v_before = program.weights.get(v_name).double()
    o_before = program.weights.get(o_name).double()

    PassManager.parse(f"iter-smooth{{alpha={alpha} ov-reduce=max enable-subgraph-type=ov}}").run(
        program
    )

    v_after = program.weights.get(v_name).double()
    o_after = program.weights.get(o_name).double()
    assert torch.allclose(v_after, v_before / s[:, None], rtol=1e-5, atol=1e-8)
    assert torch.allclose(o_after, o_before * s[g.channel_map], rtol=1e-5, atol=1e-8)


# -- SmolLM2 ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoothing_keeps_smollm2_logits() -> None:
    """Every smoothing pass in turn on SmolLM2 keeps fp32 logits (each on top of the last)."""
    from slimc.capture import capture
    from slimc.data import calibration_samples, eval_token_ids, load_model

    model, tok = load_model(None)
    program = capture(model)
    program.calibration = [(ids,) for ids in calibration_samples(tok, n=8)]
    program.context = RunContext(progress=False)
    window = eval_token_ids(tok)[:512].unsqueeze(0)
    ref = float_logits(program, window)
    am = AnalysisManager(program)
    steps = (
        ("iter-smooth", "ov", 30),
        ("smooth-quant", "norm-linear", 60),
        # the searching passes, with small grids so the test stays short
        ("flex-smooth-quant{grid-step=0.25 max-tokens=256}", "up-down", 30),
        ("awq{group-size=64 n-grid=4 search-samples=2}", "ov", 30),
        ("flex-awq-ssz{grid-step=0.25 max-tokens=256 act-quant=none}", "norm-linear", 60),
    )
    for pipeline, kind, count in steps:
        PassManager.parse(pipeline).run(program, am)
        name = pipeline.split("{")[0]
        assert program.statistics[name][f"smoothed {kind} groups"] == count
        err = rel_err(float_logits(program, window), ref)
        print(f"\nSmolLM2 after {pipeline}: max relative logit error {err:.3g}")
        assert err < TOLERANCE
