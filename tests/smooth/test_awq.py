"""AWQ: exact folding, the LCA region executor, and the ratio search."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import fx

from slimc.analyses.linear_groups import LinearGroup, LinearGroups
from slimc.calibration import evenly_spaced
from slimc.capture import capture
from slimc.pass_base import OptionError
from slimc.pass_manager import PassManager
from slimc.passes import awq as awq_mod
from slimc.passes.awq import AWQ, fake_quant_weights, region_loss, search_scale
from slimc.program import Program, RunContext, node_loc
from slimc.runner import LayerwiseRunner, Segment, split_segments
from slimc.smooth.fold import fold_scale
from slimc.smooth.region import Recorder, Region, RegionError, common_prefix, lca_region
from tests.models import tiny_llama

SPEC = AWQ(group_size=32).weight_spec()


@pytest.fixture(scope="module")
def captured() -> Program:
    return capture(tiny_llama(layers=2))


@pytest.fixture
def program(captured: Program) -> Program:
    p = copy.deepcopy(captured)
    gen = torch.Generator().manual_seed(1)
    p.calibration = [(torch.randint(0, 128, (1, 24 + 4 * i), generator=gen),) for i in range(4)]
    p.context = RunContext(progress=False)
    return p


def record_all(program: Program, *args: Any) -> dict[fx.Node, Any]:
    """Every node's value in one normal forward of the whole graph."""
    values: dict[fx.Node, Any] = {}

    class Recording(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n] = super().run_node(n)
            return values[n]

    with torch.inference_mode():
        Recording(program.graph_module).run(*args)
    return values


def group_at(program: Program, kind: str, layer: int, first_target: str) -> LinearGroup:
    for g in LinearGroups.compute(program).groups:
        loc = node_loc(g.targets[0]) or ""
        if g.kind == kind and loc == f"model.layers.{layer}.{first_target}":
            return g
    raise AssertionError(f"no {kind} group at layer {layer} starting with {first_target}")


def segment_of(program: Program, node: fx.Node) -> Segment:
    return next(s for s in split_segments(program.graph) if node in s.nodes)


def region_inputs(
    program: Program, region: Region, group: LinearGroup
) -> tuple[list[dict[fx.Node, Any]], torch.Tensor]:
    """Region inputs per calibration sample and the group input's mean |x| (whole-graph runs)."""
    inputs, total, tokens = [], 0.0, 0
    for sample in program.calibration or ():
        values = record_all(program, *sample)
        inputs.append({n: values[n] for n in region.inputs})
        x = values[group.input].reshape(-1, values[group.input].shape[-1])
        total = total + x.abs().double().sum(0)
        tokens += x.shape[0]
    return inputs, total / tokens


def logits(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def test_float_logits_unchanged_and_weights_changed(program: Program) -> None:
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(7))
    ref = logits(program(ids)).detach()
    q_before = program.weights.get("model.layers.0.self_attn.q_proj.weight").clone()
    PassManager.parse([AWQ(group_size=32)]).run(program)
    out = logits(program(ids)).detach()
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel < 1e-4
    assert not torch.equal(q_before, program.weights.get("model.layers.0.self_attn.q_proj.weight"))
    stats = program.statistics["awq"]
    assert stats["smoothed norm-linear groups"] == 4 and stats["smoothed ov groups"] == 2
    assert stats.get("groups scaled", 0) > 0
    assert "region fallbacks (linears' own outputs)" not in stats


@pytest.mark.parametrize(
    ("kind", "first", "prefix", "output"),
    [
        ("norm-linear", "self_attn.q_proj", "model.layers.1.self_attn", "self_attn.o_proj"),
        ("norm-linear", "mlp.gate_proj", "model.layers.1.mlp", "mlp.down_proj"),
        ("ov", "self_attn.o_proj", "model.layers.1.self_attn.o_proj", "self_attn.o_proj"),
    ],
)
def test_region_reproduces_float_forward(
    program: Program, kind: str, first: str, prefix: str, output: str
) -> None:
    group = group_at(program, kind, 1, first)
    region = lca_region(group.targets, segment_of(program, group.targets[0]).nodes)
    assert region.prefix == prefix
    assert [node_loc(n) for n in region.outputs] == [f"model.layers.1.{output}"]
    assert all(t in region.nodes for t in group.targets)
    sample = program.calibration[0]  # type: ignore[index]
    values = record_all(program, *sample)
    with torch.inference_mode():
        (out,) = region.run(program, {n: values[n] for n in region.inputs})
    assert torch.equal(out, values[region.outputs[0]])


def test_recorder_captures_region_inputs_through_the_runner(program: Program) -> None:
    group = group_at(program, "norm-linear", 1, "self_attn.q_proj")
    seg = segment_of(program, group.targets[0])
    region = lca_region(group.targets, seg.nodes)
    rec = Recorder(region)
    samples = list(program.calibration or ())

    def visit(s: Segment, runner: LayerwiseRunner) -> None:
        if s.key == seg.key:
            runner.forward(s.nodes, rec.hooks())

    LayerwiseRunner(program, samples, progress=False).run(visit)
    assert len(rec.samples) == len(samples)
    for sample, inputs in zip(samples, rec.samples, strict=True):
        assert set(inputs) == set(region.inputs)
        values = record_all(program, *sample)
        with torch.inference_mode():
            (out,) = region.run(program, inputs)
        assert torch.equal(out, values[region.outputs[0]])


def test_common_prefix() -> None:
    assert common_prefix(["a.b.q", "a.b.k", "a.b.v"]) == "a.b"
    assert common_prefix(["a.b.q"]) == "a.b.q"
    assert common_prefix(["x.q", "y.q"]) == ""


def test_region_across_layers_is_refused(program: Program) -> None:
    g0 = group_at(program, "ov", 0, "self_attn.o_proj")
    g1 = group_at(program, "ov", 1, "self_attn.o_proj")
    seg = segment_of(program, g0.targets[0])
    with pytest.raises(
        RegionError,
        match=r"^targets model\.layers\.1\.self_attn\.o_proj are not in the segment of module "
        r"model\.layers$",
    ):
        lca_region((g0.targets[0], g1.targets[0]), seg.nodes)


@pytest.mark.parametrize(
    ("kind", "first"),
    [("norm-linear", "self_attn.q_proj"), ("ov", "self_attn.o_proj"), ("up-down", "mlp.down_proj")],
)
def test_search_picks_the_grid_minimum_and_never_loses_to_ratio_zero(
    program: Program, kind: str, first: str
) -> None:
    group = group_at(program, kind, 0, first)
    region = lca_region(group.targets, segment_of(program, group.targets[0]).nodes)
    inputs, act_mean = region_inputs(program, region, group)
    before = {
        str(t.args[1].target): program.weights.get(str(t.args[1].target)).clone()
        for t in group.targets
    }  # type: ignore[union-attr]
    result = search_scale(program, group, region, inputs, act_mean, SPEC, n_grid=10)
    assert result.ratios == [i / 10 for i in range(10)]
    assert len(result.losses) == 10
    assert result.best == min(range(10), key=lambda i: result.losses[i])
    # the quantized region's error with the chosen scale is at most the unsmoothed one's
    assert result.loss <= result.base_loss
    assert result.scale.shape == (group.source_channels(),)
    for target, w in before.items():  # the search leaves the weights as it found them
        assert torch.equal(program.weights.get(target), w)
    # the chosen loss is reproducible from the pieces the search is made of
    with torch.inference_mode():
        refs = [region.run(program, x) for x in inputs]
        again = region_loss(
            program, region, inputs, refs, fake_quant_weights(program, group, result.scale, SPEC)
        )
    assert again == pytest.approx(result.loss, rel=1e-9)


@pytest.mark.parametrize(("kind", "first"), [("ov", "self_attn.o_proj")])
def test_what_is_measured_is_what_is_folded(program: Program, kind: str, first: str) -> None:
    """After folding the chosen (GQA-reduced) scale, the unsmoothed loss equals the chosen one."""
    group = group_at(program, kind, 0, first)
    assert group.channel_map is not None and group.source_channels() < group.channels
    region = lca_region(group.targets, segment_of(program, group.targets[0]).nodes)
    inputs, act_mean = region_inputs(program, region, group)
    result = search_scale(program, group, region, inputs, act_mean, SPEC, n_grid=10)
    assert result.best > 0
    fold_scale(program, group, result.scale)
    inputs, act_mean = region_inputs(program, region, group)
    after = search_scale(program, group, region, inputs, act_mean, SPEC, n_grid=1)
    assert after.base_loss == pytest.approx(result.loss, rel=1e-3)


def test_fallback_to_the_linears_own_outputs(
    program: Program, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(targets: Any, nodes: Any) -> Region:
        raise RegionError("refused for the test")

    monkeypatch.setattr(awq_mod, "lca_region", refuse)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    ref = logits(program(ids)).detach()
    PassManager.parse([AWQ(n_grid=4, enable_subgraph_type=("norm-linear",))]).run(program)
    out = logits(program(ids)).detach()
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    assert program.statistics["awq"]["region fallbacks (linears' own outputs)"] == 4


def test_options() -> None:
    with pytest.raises(OptionError, match="bits"):
        AWQ(bits=3)
    with pytest.raises(OptionError, match="n-grid"):
        AWQ(n_grid=0)
    assert AWQ().weight_spec().granularity == "channel"
    assert AWQ(group_size=64).weight_spec(k=96).granularity == "channel"
    assert AWQ(group_size=32).weight_spec(k=96).group_size == 32
    assert not AWQ().weight_spec().symmetric and AWQ().weight_spec().bits == 4
    assert evenly_spaced(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced(list(range(3)), 0) == [0, 1, 2]
