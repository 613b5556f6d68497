"""The `slimc` torch.compile backend: entry point, golden IR against capture, numerics, refusals."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import slimc
from slimc import registry
from slimc.backend import BackendOptions, CompiledGraph, resolve_pipeline, slimc_backend
from slimc.capture import capture
from slimc.dynamo_capture import dotted_path
from slimc.errors import PipelineError, UserError
from slimc.ir.printer import print_program
from slimc.nn import QuantizedLinear
from slimc.pass_manager import PassManager
from slimc.program import SCHEME_KEY, Program, node_loc
from slimc.stage import Stage
from tests.models import tiny_llama, tiny_mlp

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = ["w8a8-dynamic", "w4a16{group-size=32}"]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    """Every test compiles from scratch (no cached graphs, no recompile limit reached)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _quantized(pipeline: str, **kwargs: Any) -> tuple[nn.Module, tuple[torch.Tensor]]:
    model = tiny_mlp(seed=0)
    x = model.example_inputs()
    return slimc.compile(model, pipeline, example_inputs=x, progress=False, **kwargs), x


def _captured_ir(
    model: nn.Module, example_inputs: tuple[Any, ...], stage: Stage, **capture_options: Any
) -> str:
    """What slimc's own capture makes of the quantized model: export, then canonicalize."""
    program = capture(model, example_inputs, canonicalize=False, **capture_options)
    program.stage = stage
    PassManager.parse("canonicalize", start_stage=stage).run(program)
    return print_program(program)


def _sections(path: Path) -> list[tuple[str, str]]:
    """(banner, IR) pairs of a `dump_ir` file."""
    parts = re.split(r"^(// -----// slimc backend: .*)$", path.read_text(), flags=re.M)
    return [(parts[i], parts[i + 1].strip("\n")) for i in range(1, len(parts), 2)]


def _spy(programs: list[Program], **options: Any) -> Any:
    """A backend that runs slimc_backend and keeps the programs it compiled."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        compiled = slimc_backend(gm, example_inputs, **options)
        if isinstance(compiled, CompiledGraph):
            programs.append(compiled.program)
        return compiled

    return backend


# -- entry point and layering -------------------------------------------------------------------
def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )


def test_backend_is_found_by_name_through_the_entry_point() -> None:
    result = _run_python(
        """
        import sys
        import torch, torch._dynamo
        import slimc
        assert "slimc" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        assert "slimc.backend" not in sys.modules
        import slimc.ops

        def f(x):
            q, scale = torch.ops.slimc.quantize_per_token(x)
            return q.float() * scale

        x = torch.randn(4, 16)
        out = torch.compile(f, backend="slimc", options={"pipeline": ""})(x)
        assert "slimc.backend" in sys.modules
        assert torch.equal(out, f(x))
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_backend_module_does_not_import_passes_kernels_or_triton() -> None:
    result = _run_python(
        """
        import sys
        import slimc.backend, slimc.dynamo_capture
        bad = [m for m in sys.modules
               if m.startswith(("slimc.passes", "slimc.kernels", "slimc.tools", "triton"))]
        assert not bad, bad
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_backend_is_public_api() -> None:
    assert "backend" in slimc.__all__
    assert slimc.backend.slimc_backend is slimc_backend


# -- golden IR: the Dynamo entry point gives what capture gives ----------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_ir_from_dynamo_is_identical_to_capture(scheme: str, tmp_path: Path) -> None:
    q, x = _quantized(scheme)
    expected = _captured_ir(q, x, Stage.FUSED)
    dump = tmp_path / "ir.mlir"
    torch.compile(q, backend="slimc", options={"pipeline": "", "dump_ir": str(dump)})(*x)
    (banner, before), (_, after) = _sections(dump)
    assert "IR Before lowering" in banner
    assert before == expected
    assert after == expected  # empty pipeline: nothing lowered
    assert "// stage: fused" in before and 'loc("fc1")' in before


def _alpha_renamed(text: str, aliases: dict[str, str]) -> str:
    """SSA names renumbered in order of definition; constants by their canonical tied name."""
    consts = dict(re.findall(r'%(\S+) = const "([^"]+)"', text))
    names: dict[str, str] = {}
    lines = []
    for line in text.splitlines():
        if " = const " in line:
            continue
        m = re.match(r"\s*%(\w+) = ", line)
        if m and m.group(1) not in consts:
            names[m.group(1)] = f"v{len(names)}"

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in consts:
                return "@" + aliases.get(consts[name], consts[name])
            return "%" + names.get(name, name)

        lines.append(re.sub(r"%(\w+)", sub, line))
    declared = sorted(aliases.get(c, c) for c in consts.values())
    return "\n".join([*declared, *lines])


def test_llama_ir_from_dynamo_matches_capture_up_to_names(tmp_path: Path) -> None:
    """On a decoder the ops are identical; only SSA numbering and tied-weight names differ."""
    q = slimc.compile(tiny_llama(seed=0, layers=1), "w8a8-dynamic", progress=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    # static shapes, as Dynamo's first compile
    expected = _captured_ir(q, (ids,), Stage.FUSED, dynamic_shapes=({},))
    dump = tmp_path / "ir.mlir"
    with torch.no_grad():
        out = torch.compile(q, backend="slimc", options={"pipeline": "", "dump_ir": str(dump)})(
            input_ids=ids, use_cache=False
        ).logits
        ref = q(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    by_tensor: dict[int, list[str]] = {}
    for name, t in [*q.named_parameters(remove_duplicate=False), *q.named_buffers()]:
        by_tensor.setdefault(t.data_ptr(), []).append(name)
    aliases = {n: min(names) for names in by_tensor.values() for n in names}
    (_, before), _ = _sections(dump)
    assert _alpha_renamed(before, aliases) == _alpha_renamed(expected, aliases)


# -- numerics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_compiled_model_matches_eager_quantized_model(scheme: str) -> None:
    q, x = _quantized(scheme)
    with torch.no_grad():
        ref = q(*x)
        exact = torch.compile(q, backend="slimc", options={"pipeline": ""})(*x)
        torch._dynamo.reset()
        lowered = torch.compile(q, backend="slimc")(*x)  # default lowering for CPU inputs
    assert torch.equal(exact, ref)
    # a lowering pass may accumulate differently; it must stay close to the reference ops
    torch.testing.assert_close(lowered, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("pipeline", "calib"),
    [("w8a8-dynamic", False), ("w4a16{group-size=32}", False), ("w8a8", True), ("w8a16", False)],
)
def test_schemes_are_read_back_from_the_fused_ops(pipeline: str, calib: bool) -> None:
    model = tiny_mlp(seed=0)
    x = model.example_inputs()
    q = slimc.compile(
        model, pipeline, example_inputs=x, calib=[x] if calib else None, progress=False
    )
    programs: list[Program] = []
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(q, backend=_spy(programs, pipeline=""))(*x), q(*x))
    (program,) = programs
    fused = [n for n in program.graph.nodes if SCHEME_KEY in n.meta]
    assert [node_loc(n) for n in fused] == ["fc1", "fc2"]
    for node in fused:
        module = q.get_submodule(node_loc(node) or "")
        assert isinstance(module, QuantizedLinear)
        assert node.meta[SCHEME_KEY] == module.scheme


@pytest.mark.skipif("lower-npu" not in registry.all_pass_names(), reason="lower-npu not registered")
def test_an_explicit_lowering_pipeline_binds_kernels(tmp_path: Path) -> None:
    q, x = _quantized("w8a8-dynamic")
    dump = tmp_path / "ir.mlir"
    with torch.no_grad():
        out = torch.compile(
            q, backend="slimc", options={"pipeline": "lower-npu", "dump_ir": str(dump)}
        )(*x)
        ref = q(*x)
    (_, before), (banner, after) = _sections(dump)
    assert "IR After lower-npu" in banner
    assert "// stage: kernel" in after and 'kernel = "npu.' in after
    assert "slimc.linear_w8a8" in before and "slimc.linear_w8a8" not in after
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


class QDQLinear(nn.Module):
    """A linear written directly in QDQ form: dequantize_affine(int8 weight) then F.linear."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.ops.slimc.dequantize_affine(
            self.qweight, [1, -1], self.scale, None, -128, 127, torch.float32
        )
        return F.linear(x, w, self.bias)


def test_qdq_graph_is_fused_by_the_backend(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(QDQLinear(nn.Linear(64, 32)), nn.ReLU()).eval()
    x = torch.randn(2, 8, 64)
    dump = tmp_path / "ir.mlir"
    programs: list[Program] = []
    spy = _spy(programs, pipeline="fuse-quantized-linear", dump_ir=str(dump))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=spy)(x), model(x))
    (_, before), (_, after) = _sections(dump)
    assert "// stage: qdq" in before and "slimc.dequantize_affine" in before
    assert "// stage: fused" in after and "slimc.linear_w8a16" in after
    (program,) = programs
    (node,) = [n for n in program.graph.nodes if SCHEME_KEY in n.meta]
    assert node.meta[SCHEME_KEY] == slimc.quant.scheme.make_scheme("w8a16")


def test_dynamic_shapes(tmp_path: Path) -> None:
    q, _ = _quantized("w8a8-dynamic")
    dump = tmp_path / "ir.mlir"
    compiled = torch.compile(q, backend="slimc", dynamic=True, options={"dump_ir": str(dump)})
    with torch.no_grad():
        for shape in [(2, 8, 64), (3, 5, 64)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(compiled(x), q(x), rtol=2e-2, atol=2e-2)
    sections = _sections(dump)
    assert len(sections) == 2  # one graph, compiled once for every shape
    assert re.search(r"graph @forward\(%x: f32\[s\d+, s\d+, 64\]\)", sections[0][1])


# -- graph breaks --------------------------------------------------------------------------------
class Broken(nn.Module):
    """Float work, a graph break, fc1, a graph break, fc2: three Dynamo graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x) * 2
        torch._dynamo.graph_break()
        h = torch.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.fc2(h) + x


def test_graph_breaks_compile_each_graph_separately(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = Broken().eval()
    x = torch.randn(2, 8, 64)
    q = slimc.compile(model, "w8a8-dynamic", example_inputs=(x,), progress=False)
    dump = tmp_path / "ir.mlir"
    with caplog.at_level(logging.INFO, logger="slimc.backend"), torch.no_grad():
        out = torch.compile(q, backend="slimc", options={"pipeline": "", "dump_ir": str(dump)})(x)
        ref = q(x)
    assert torch.equal(out, ref)
    befores = [ir for banner, ir in _sections(dump) if "Before" in banner]
    assert len(befores) == 2  # the two graphs with a quantized linear
    assert 'loc("fc1")' in befores[0] and 'loc("fc2")' not in befores[0]
    assert 'loc("fc2")' in befores[1]
    assert "graph without slimc ops runs as is" in caplog.text
    torch._dynamo.reset()
    caplog.clear()
    options = {"pipeline": "", "float_backend": "eager"}
    with caplog.at_level(logging.INFO, logger="slimc.backend"), torch.no_grad():
        assert torch.equal(torch.compile(q, backend="slimc", options=options)(x), ref)
    assert "graph without slimc ops handed to 'eager'" in caplog.text


# -- refusals, options, fallbacks --------------------------------------------------------------------
def test_weight_changing_pipeline_is_refused() -> None:
    q, x = _quantized("w8a8-dynamic")
    compiled = torch.compile(q, backend="slimc", options={"pipeline": "smooth-quant,lower-cpu"})
    failed = torch._dynamo.exc.BackendCompilerFailed
    with pytest.raises(failed, match=r"refuses pass 'smooth-quant'.*slimc\.compile\(model"):
        compiled(*x)


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ("gptq", r"refuses pass 'gptq': it changes the model's weights"),
        ("w8a8-dynamic", r"refuses pass 'linear-quant' \(from pipeline 'w8a8-dynamic'\)"),
        ("quarot", r"refuses pass 'quarot'"),
    ],
)
def test_resolve_pipeline_refuses_weight_changes(pipeline: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_pipeline(pipeline)


def test_lowering_passes_and_device_defaults_come_from_the_passes() -> None:
    import slimc.backend as backend

    assert backend.lowering_passes() == {"lower-cpu", "lower-npu", "lower-triton"}
    assert backend.default_lowerings() == {
        "cpu": "lower-cpu",
        "cuda": "lower-triton",
        "npu": "lower-npu",
    }
    assert {cls.name for cls in registry.passes_with_role("lowering").values()} == (
        backend.lowering_passes()
    )


def test_resolve_pipeline_keeps_stage_generic_and_lowering_passes() -> None:
    specs = resolve_pipeline("canonicalize,fuse-quantized-linear")
    assert [s.name for s in specs] == ["canonicalize", "fuse-quantized-linear"]
    with pytest.raises(PipelineError, match="unknown pass 'no-such-pass'"):
        resolve_pipeline("no-such-pass")


def test_unavailable_lowering_pass_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    import slimc.backend as backend

    monkeypatch.setattr(backend, "default_lowerings", lambda: {"cpu": "lower-nowhere"})
    monkeypatch.setattr(backend, "lowering_passes", lambda: frozenset({"lower-nowhere"}))
    monkeypatch.setattr(backend, "_WARNED", set())
    assert resolve_pipeline("lower-nowhere") == []
    q, x = _quantized("w4a16{group-size=32}")
    dump = tmp_path / "ir.mlir"
    with caplog.at_level(logging.WARNING, logger="slimc.backend"), torch.no_grad():
        out = torch.compile(q, backend="slimc", options={"dump_ir": str(dump)})(*x)
        ref = q(*x)
    assert torch.equal(out, ref)
    assert "lowering pass 'lower-nowhere' is not available" in caplog.text
    (_, before), (banner, after) = _sections(dump)
    assert "IR After no lowering" in banner and after == before


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(UserError, match="no option 'pipelin'"):
        BackendOptions.parse({"pipelin": ""})
    with pytest.raises(UserError, match="option 'fallback'"):
        BackendOptions.parse({"fallback": "yes"})
    assert BackendOptions.parse({"dump_ir": Path("a.mlir")}).dump_ir == "a.mlir"


@pytest.mark.parametrize(
    ("text", "root", "path"),
    [
        ("L['self']._modules['model']._modules['layers']._modules['0']._parameters['w']", "self",
         "model.layers.0.w"),
        ("L['self'].model.layers[0].self_attn", "self", "model.layers.0.self_attn"),
        ("L['self']", "self", ""),
        ("G['net'].fc1", None, "net.fc1"),
        ("G['net'].fc1", "net", "fc1"),
        ("L['kwargs']['input_ids']", "self", "kwargs.input_ids"),
        # a forward wrapped in a `*args` decorator: the module is the first positional argument
        ("L['args'][0]._modules['model']._parameters['w']", "args.0", "model.w"),
        ("L['args'][0].model.layers[0]", "args.0", "model.layers.0"),
        ("L['args'][1]", "args.0", "args.1"),
        ("getattr(L['self'], 'x')", "self", None),
    ],
)  # fmt: skip
def test_dotted_path(text: str, root: str | None, path: str | None) -> None:
    assert dotted_path(text, root) == path


class Wrapped(nn.Module):
    """A quantized model inside another module whose forward names itself `s`, not `self`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.offset = torch.linspace(0, 1, 64)  # a plain tensor attribute, not a buffer

    def forward(s, x: torch.Tensor) -> torch.Tensor:  # noqa: N805
        return s.inner(x + s.offset)


def test_names_are_relative_to_the_compiled_module(tmp_path: Path) -> None:
    q, x = _quantized("w8a8-dynamic")
    model = Wrapped(q)
    dump = tmp_path / "ir.mlir"
    with torch.no_grad():
        out = torch.compile(model, backend="slimc", options={"pipeline": "", "dump_ir": str(dump)})(
            *x
        )
        assert torch.equal(out, model(*x))
    (_, before), _ = _sections(dump)
    assert 'const "inner.fc1.qweight"' in before and 'const "offset"' in before
    assert 'loc("inner.fc2")' in before
