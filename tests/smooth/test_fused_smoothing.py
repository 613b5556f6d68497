"""Every smoothing pass on fused projections (Phi-3, GPT-NeoX): exact, only the rows read scaled."""

from __future__ import annotations

import pytest
import torch

from slimc.analyses.linear_groups import GROUP_KINDS, LinearGroups
from slimc.analysis import AnalysisManager
from slimc.pass_base import Pass
from slimc.pass_manager import PassManager
from slimc.passes.awq import AWQ
from slimc.passes.flex_awq_ssz import FlexAWQSSZ
from slimc.passes.flex_smooth_quant import FlexSmoothQuant
from slimc.passes.iter_smooth import IterSmooth
from slimc.passes.smooth_quant import SmoothQuant
from slimc.program import Program
from tests.models import float_logits, rel_err, with_token_calibration
from tests.smooth.fused_models import captured_family

TOLERANCE = 1e-4  # max |out - ref| / max |ref|, fp32
PASSES: list[Pass] = [
    SmoothQuant(enable_subgraph_type=GROUP_KINDS),
    IterSmooth(),
    FlexSmoothQuant(grid_step=0.25, max_tokens=64),
    AWQ(n_grid=4, group_size=32, search_samples=2),
    FlexAWQSSZ(grid_step=0.25, max_tokens=64, group_size=32),
]
FUSED_KINDS = {"phi3": {"ov": 2, "up-down": 2}, "gpt_neox": {"ov": 2}}


def program_of(model: str) -> Program:
    return with_token_calibration(captured_family(model), samples=4, length=24)


@pytest.mark.parametrize("model", list(FUSED_KINDS))
@pytest.mark.parametrize("pass_", PASSES, ids=lambda p: p.name)
def test_every_smoothing_pass_is_exact_on_fused_projections(model: str, pass_: Pass) -> None:
    program = program_of(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))
    ref = float_logits(program, ids)
    am = AnalysisManager(program)
    groups = am.get(LinearGroups)
    found = {k: sum(g.kind == k for g in groups.groups) for k in FUSED_KINDS[model]}
    assert found == FUSED_KINDS[model]
    PassManager.parse([pass_]).run(program, am)
    assert rel_err(float_logits(program, ids), ref) < TOLERANCE
    stats = program.statistics[pass_.name]
    assert not any(key.startswith("skipped") for key in stats), stats
    if pass_.name in ("smooth-quant", "iter-smooth", "flex-smooth-quant", "flex-awq-ssz"):
        for kind, n in FUSED_KINDS[model].items():
            assert stats[f"smoothed {kind} groups"] == n


@pytest.mark.parametrize("model", list(FUSED_KINDS))
def test_only_the_rows_read_are_scaled(model: str) -> None:
    """ov and up-down alone: the q, k (and gate) rows of the fused weights stay bit for bit."""
    program = program_of(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))
    ref = float_logits(program, ids)
    am = AnalysisManager(program)
    fused = [g for g in am.get(LinearGroups).groups if g.rows is not None]
    assert len(fused) == sum(FUSED_KINDS[model].values())
    before = {}
    for g in fused:
        assert g.producer is not None
        for const in (g.producer.args[1], *g.producer.args[2:3]):
            name = str(const.target)  # type: ignore[union-attr]
            before[name] = (g.rows, program.weights.get(name).clone())
    PassManager.parse([IterSmooth(enable_subgraph_type=("ov", "up-down"))]).run(program, am)
    assert rel_err(float_logits(program, ids), ref) < TOLERANCE
    for name, (rows, old) in before.items():
        new = program.weights.get(name)
        kept = torch.ones(old.shape[0], dtype=torch.bool)
        kept[rows] = False
        assert torch.equal(new[kept], old[kept]), name
        assert not torch.equal(new[rows], old[rows]), name
