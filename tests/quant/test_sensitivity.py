"""Layer sensitivity ranking and the quantizers' `sensitive-fraction` option."""

from __future__ import annotations

import copy

import pytest
import torch

from slimc.capture import capture
from slimc.errors import PipelineError
from slimc.linear_select import float_linears, matches
from slimc.pass_manager import PassManager
from slimc.program import SCHEME_KEY, Program, RunContext, node_loc
from slimc.quant.scheme import make_scheme
from slimc.quant.sensitivity import LayerScore, most_sensitive, rank_layers
from tests.models import tiny_llama

OUTLIER_LAYER = 1


@pytest.fixture(scope="module")
def program() -> Program:
    """A 3-layer tiny Llama whose layer 1 up_proj has one huge input column per row.

    Per-channel int4 rounds every other weight of those rows to zero, so layer 1 is by far
    the most sensitive to a w4a4 probe.
    """
    model = tiny_llama(layers=3)
    with torch.no_grad():
        model.model.layers[OUTLIER_LAYER].mlp.up_proj.weight[:, 0] *= 60.0
    p = capture(model)
    gen = torch.Generator().manual_seed(1)
    p.calibration = [(torch.randint(0, 128, (1, 32), generator=gen),) for _ in range(4)]
    p.context = RunContext(progress=False)
    return p


def mlp_linears(p: Program) -> list[torch.fx.Node]:
    return [n for n in float_linears(p) if matches(node_loc(n), ("*mlp*",))]


def test_ranking_finds_the_outlier_layer_and_changes_nothing(program: Program) -> None:
    p = copy.deepcopy(program)
    before = {k: v.clone() for k, v in p.weights.items()}
    ranked = rank_layers(p, make_scheme("w4a4"), mlp_linears(p), p.calibration, progress=False)
    assert [s.layer for s in ranked][0] == f"model.layers.{OUTLIER_LAYER}"
    assert sorted(s.layer for s in ranked) == [f"model.layers.{i}" for i in range(3)]
    assert all(s.score > 0 for s in ranked)
    assert ranked[0].score > 10 * ranked[1].score
    assert set(ranked[0].linears) == {
        f"model.layers.{OUTLIER_LAYER}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")
    }
    assert all(torch.equal(before[k], v) for k, v in p.weights.items())


def test_a_finer_probe_scores_every_layer_lower(program: Program) -> None:
    p = copy.deepcopy(program)
    linears = mlp_linears(p)
    coarse = {
        s.layer: s.score
        for s in rank_layers(p, make_scheme("w4a4"), linears, p.calibration, progress=False)
    }
    fine = {
        s.layer: s.score
        for s in rank_layers(p, make_scheme("w8a16"), linears, p.calibration, progress=False)
    }
    assert coarse.keys() == fine.keys()
    assert all(fine[k] < coarse[k] for k in coarse)


@pytest.mark.parametrize(
    ("fraction", "count"), [(0.0, 0), (0.01, 1), (0.25, 8), (0.5, 15), (1.0, 30)]
)
def test_most_sensitive_takes_the_fraction_rounded_up(fraction: float, count: int) -> None:
    scores = [LayerScore(f"l{i}", (), float(30 - i)) for i in range(30)]
    top = most_sensitive(scores, fraction)
    assert [s.layer for s in top] == [f"l{i}" for i in range(count)]


def test_most_sensitive_ignores_float_noise_in_the_product() -> None:
    scores = [LayerScore(f"l{i}", (), float(-i)) for i in range(100)]
    assert len(most_sensitive(scores, 0.07)) == 7  # 0.07 * 100 = 7.000000000000001


def test_sensitive_layers_join_the_only_set(program: Program) -> None:
    p = copy.deepcopy(program)
    PassManager.parse(
        "linear-quant{scheme=w8a8-dynamic only=*self_attn* sensitive-fraction=0.3}"
    ).run(p)
    quantized = {node_loc(n) for n in p.graph.nodes if SCHEME_KEY in n.meta}
    attn = {f"model.layers.{i}.self_attn.{m}_proj" for i in range(3) for m in "qkvo"}
    mlp = {f"model.layers.{OUTLIER_LAYER}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
    assert quantized == attn | mlp
    assert p.statistics["linear-quant"]["sensitive decoder layers added"] == 1  # ceil(0.3 * 3)


def test_sensitive_modules_choose_what_is_probed_and_added(program: Program) -> None:
    p = copy.deepcopy(program)
    PassManager.parse(
        "linear-quant{scheme=w8a8-dynamic only=*self_attn* sensitive-fraction=0.3 "
        "sensitive-modules=*up_proj}"
    ).run(p)
    quantized = {node_loc(n) for n in p.graph.nodes if SCHEME_KEY in n.meta}
    assert quantized - {
        f"model.layers.{i}.self_attn.{m}_proj" for i in range(3) for m in "qkvo"
    } == {f"model.layers.{OUTLIER_LAYER}.mlp.up_proj"}


def test_sensitive_fraction_is_checked_and_asks_for_calibration() -> None:
    with pytest.raises(PipelineError, match="sensitive-fraction must be in"):
        PassManager.parse("linear-quant{sensitive-fraction=1.5}")
    pm = PassManager.parse("linear-quant{scheme=w4a16 only=*self_attn* sensitive-fraction=0.2}")
    assert pm.needs_calibration
    assert not PassManager.parse("linear-quant{scheme=w4a16}").needs_calibration
