"""slimc/ops/fused.py: one description of each fused linear, read and built by argument role."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import fx

from slimc.capture import capture
from slimc.ir.builder import constant_value, new_constant
from slimc.ops.fused import (
    FUSED_LINEARS,
    FUSED_OP_NAMES,
    LINEAR_W4A8,
    LINEAR_W4A16,
    LINEAR_W8A8,
    LINEAR_W8A16,
    FusedLinear,
    LinearArgs,
    bound_args,
    fused_linear_for,
    fused_linear_kind,
)
from slimc.pass_manager import PassManager
from slimc.program import SCHEME_KEY, Program
from slimc.quant.scheme import make_scheme
from tests.models import tiny_mlp

ROOT = Path(__file__).resolve().parents[2]


def _fused_program(scheme: str) -> Program:
    model = tiny_mlp(seed=0)
    x = model.example_inputs()
    program = capture(model, x)
    program.calibration = [x]
    PassManager.parse(f"linear-quant{{scheme={scheme}}},fuse-quantized-linear").run(program)
    return program


def _fused_nodes(program: Program) -> list[fx.Node]:
    return [n for n in program.graph.nodes if fused_linear_kind(n) is not None]


def test_descriptions_name_the_registered_schema_arguments() -> None:
    for name, fused in FUSED_LINEARS.items():
        schema = fused.op._schema
        assert schema.name == f"slimc::{name}"
        assert fused.arg_names == tuple(a.name for a in schema.arguments)
        assert set(fused.arg_of.values()) == set(fused.arg_names)  # every argument has a role
        assert "qweight" in fused.weights and "bias" in fused.weights
    assert LINEAR_W8A16.weights == ("qweight", "scale", "zero_point", "bias")
    assert LINEAR_W8A8.weights == ("qweight", "w_scale", "bias")
    assert {*FUSED_LINEARS, "quantize_per_token"} == FUSED_OP_NAMES


def test_a_description_naming_a_missing_argument_is_refused() -> None:
    with pytest.raises(TypeError, match="no argument 'w_zero_point' for role"):
        FusedLinear("linear_w4a8", 4, True, {"input": "xq", "weight_zero_point": "w_zero_point"})


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        ("w8a16", LINEAR_W8A16),
        ("w4a16", LINEAR_W4A16),
        ("w8a8", LINEAR_W8A8),
        ("w8a8-dynamic", LINEAR_W8A8),
        ("w4a8", LINEAR_W4A8),
        ("w4a4", LINEAR_W4A8),
    ],
)
def test_scheme_maps_to_its_fused_linear(scheme: str, expected: FusedLinear) -> None:
    assert fused_linear_for(make_scheme(scheme)) is expected


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16", "w8a8", "w8a8-dynamic", "w4a8"])
def test_read_then_call_args_gives_the_node_arguments_back(scheme: str) -> None:
    program = _fused_program(scheme)
    nodes = _fused_nodes(program)
    assert nodes
    for node in nodes:
        fused = fused_linear_kind(node)
        assert fused is fused_linear_for(node.meta[SCHEME_KEY])
        args = fused.read(node)
        assert fused.call_args(args) == node.args
        weight = constant_value(program, args.weight)
        assert weight is not None and weight.dtype == (
            torch.uint8 if fused.weight_bits == 4 else torch.int8
        )
        assert args.input.meta["val"].dtype == (
            torch.int8 if fused.quantized_input else torch.float32
        )


def test_call_args_refuses_a_role_the_op_does_not_take() -> None:
    with pytest.raises(ValueError, match="linear_w4a8 takes no weight_zero_point"):
        LINEAR_W4A8.call_args(LinearArgs("xq", "w", "s", weight_zero_point="zp"))
    with pytest.raises(ValueError, match="linear_w8a8 takes no group_size"):
        LINEAR_W8A8.call_args(LinearArgs("xq", "w", "s", group_size=32))


def test_bound_args_fills_schema_defaults_and_kwargs() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    qt = graph.call_function(torch.ops.slimc.quantize_per_token.default, (x,), {"qmax": 7})
    assert bound_args(qt) == {"x": x, "qmin": -128, "qmax": 7}
    with pytest.raises(TypeError, match="does not call an op with a schema"):
        bound_args(x)


def test_constant_helpers() -> None:
    program = _fused_program("w8a16")
    node = _fused_nodes(program)[0]
    args = LINEAR_W8A16.read(node)
    assert constant_value(program, None) is None
    with pytest.raises(KeyError, match="is not a constant"):
        constant_value(program, args.input, error=KeyError)
    made = new_constant(program, node, "extra", torch.ones(3))
    assert made.op == "get_attr" and str(made.target).endswith(".extra")
    assert torch.equal(constant_value(program, made), torch.ones(3))
    again = new_constant(program, node, "extra", torch.zeros(3))
    assert again.target != made.target  # a fresh name, the first constant kept


def test_core_modules_do_not_import_passes_for_linear_matching() -> None:
    code = """
        import sys
        import slimc.write_back, slimc.lowering, slimc.backend, slimc.linear_match
        bad = [m for m in sys.modules if m.startswith(("slimc.passes", "passes"))]
        assert not bad, bad
        print("ok")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
