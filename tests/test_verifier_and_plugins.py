"""The IR verifier's stage invariants and plugin passes registered through entry points."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest
import torch

import slimc.ops  # noqa: F401
from slimc import registry
from slimc.analysis import AnalysisManager
from slimc.capture import capture
from slimc.ir.verifier import VerificationError, verify
from slimc.pass_base import Pass, PassResult
from slimc.pass_manager import PassManager
from slimc.program import Program
from slimc.stage import Stage
from tests.models import tiny_mlp


@pytest.fixture
def mlp_program() -> Program:
    model = tiny_mlp()
    return capture(model, model.example_inputs())


def test_captured_program_verifies(mlp_program: Program) -> None:
    verify(mlp_program)


def test_slimc_op_in_aten_stage_is_rejected(mlp_program: Program) -> None:
    PassManager.parse('linear-quant{scheme=w8a16 ignore=""}').run(mlp_program)
    mlp_program.stage = Stage.ATEN
    with pytest.raises(VerificationError, match="slimc op in a float \\(aten\\) stage program"):
        verify(mlp_program, after="test")


def test_unfused_linear_at_fused_stage_is_rejected(mlp_program: Program) -> None:
    PassManager.parse('linear-quant{scheme=w8a16 ignore=""}').run(mlp_program)
    mlp_program.stage = Stage.FUSED
    with pytest.raises(VerificationError, match="unfused quantized linear at the fused stage"):
        verify(mlp_program)


def test_untyped_node_is_rejected(mlp_program: Program) -> None:
    linear = next(
        iter(mlp_program.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default))
    )
    del linear.meta["val"]
    with pytest.raises(VerificationError, match="has no meta\\['val'\\]"):
        verify(mlp_program)


@dataclass(frozen=True, kw_only=True)
class CountLinears(Pass):
    """Count linears (a plugin pass for the entry-point test)."""

    name = "count-linears"
    accepts = frozenset(Stage)

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        n = len(program.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default))
        self.stat(program, "linears", n)
        return PassResult(changed=False)


def _fake_entry_points(name: str):
    def entry_points(group: str) -> list[EntryPoint]:
        assert group == registry.ENTRY_POINT_GROUP
        return [EntryPoint(name, f"{__name__}:CountLinears", group)]

    return entry_points


def test_plugin_pass_from_entry_point(monkeypatch, mlp_program: Program) -> None:
    monkeypatch.setattr(registry, "entry_points", _fake_entry_points("count-linears"))
    assert "count-linears" in registry.all_pass_names()
    PassManager.parse("count-linears").run(mlp_program)
    assert mlp_program.statistics["count-linears"]["linears"] == 2


def test_plugin_clashing_with_builtin_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(registry, "entry_points", _fake_entry_points("linear-quant"))
    with pytest.raises(RuntimeError, match="clashes with a built-in name"):
        registry.all_pass_names()
