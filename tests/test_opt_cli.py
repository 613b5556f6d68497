"""slimc-opt: listing, pipeline errors before loading, inputs, debug flags, reproducers, -o."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from slimc import registry
from slimc.analysis import AnalysisManager
from slimc.pass_base import Pass, PassResult
from slimc.program import Program
from slimc.stage import Stage

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "passes.md"

MLP_CASE = """\
from tests.models import tiny_mlp


def build():
    model = tiny_mlp(seed=0)
    return model, model.example_inputs()
"""

LLAMA_CASE = """\
from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)
"""


LLAMA_CALIB_CASE = """\
import torch

from tests.models import tiny_llama


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_llama(seed=0, layers=2), None, calib
"""


MOE_CASE = """\
from tests.test_moe_capture import tiny_moe


def build():
    return tiny_moe("Qwen2Moe"), None
"""


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cases")
    (d / "mlp.py").write_text(MLP_CASE)
    (d / "llama.py").write_text(LLAMA_CASE)
    (d / "llama_calib.py").write_text(LLAMA_CALIB_CASE)
    (d / "moe.py").write_text(MOE_CASE)
    (d / "nobuild.py").write_text("def make():\n    return None\n")
    (d / "badreturn.py").write_text("def build():\n    return 42\n")
    (d / "raises.py").write_text("def build():\n    raise ValueError('no model today')\n")
    return d


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("slimc-opt: error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("slimc-opt: error: ")


# -- listing and pipeline printing ---------------------------------------------------------------------
def test_list_passes_names_every_pass_and_pipeline(slimc_opt) -> None:
    res = slimc_opt("--list-passes")
    assert res.rc == 0 and res.err == ""
    for name in registry.all_pass_names():
        cls = registry.get_pass(name)
        assert f"  {name} - {cls.summary()}" in res.out
        for f in cls.option_fields():
            assert f"    {f.name.replace('_', '-')}: " in res.out
    for name, named in registry.PIPELINES.items():
        assert f"  {name} - {named.summary}" in res.out
    assert "group-size: int = -1" in res.out
    assert "scheme: w8a8|w8a8-dynamic|w8a16|w4a16|w4a8|w4a4 = w8a8-dynamic" in res.out


def test_docs_passes_md_is_up_to_date(slimc_opt) -> None:
    res = slimc_opt("--list-passes", "--format=md")
    assert res.rc == 0
    current = DOCS.read_text() if DOCS.exists() else ""
    assert current == res.out, (
        "docs/passes.md is out of date; regenerate it with:\n"
        "  slimc-opt --list-passes --format=md > docs/passes.md"
    )


def test_every_pass_has_a_filecheck_test() -> None:
    for name in registry.all_pass_names():
        files = list((ROOT / "tests" / "filecheck" / name).glob("*.py"))
        assert files, f"pass {name!r} has no FileCheck test in tests/filecheck/{name}/"


def test_print_pipeline_shows_defaults_without_input(slimc_opt) -> None:
    res = slimc_opt("--print-pipeline", "-p", "w4a16{group-size=64}")
    assert res.rc == 0 and res.err == ""
    assert res.out == (
        "linear-quant{scheme=w4a16 group-size=64 symmetric=none observer=histogram ignore=lm_head "
        'only="" on-bad-group=fallback sensitive-fraction=0.0 sensitive-modules=*mlp* '
        "sensitive-probe=w4a4 calibrate-all-experts=false},fuse-quantized-linear\n"
    )


# -- errors: one line, pipeline first ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pipeline", "expected"),
    [
        ("linear-quantt", "unknown pass 'linear-quantt' (did you mean 'linear-quant'?)"),
        (
            "linear-quant{colour=red}",
            "pass 'linear-quant' has no option 'colour' (options: scheme,",
        ),
        (
            "linear-quant{group-size=abc}",
            "option 'group-size' of pass 'linear-quant': bad value 'abc'",
        ),
        (
            "linear-quant{scheme=w3a3}",
            "option 'scheme' of pass 'linear-quant': bad value 'w3a3' (expected",
        ),
        (
            "fuse-quantized-linear",
            "pass 'fuse-quantized-linear' (position 1) runs on the qdq stage",
        ),
        ("w8a16,linear-quant", "pass 'linear-quant' (position 3) runs on the aten/qdq stage"),
        ("linear-quant{scheme=w4a16", "bad pipeline: expected '}' at column 26 (at end of input)"),
        ("canonicalize,,w8a8", "bad pipeline: expected a pass name at column 14 (near ',w8a8')"),
        ("linear-quant{scheme=}", "bad pipeline: expected an option value at column 21 (near '}')"),
    ],
)
@pytest.mark.parametrize("missing", ["no/such/model_dir", "no_such_case.py", "no_such.pt2"])
def test_pipeline_errors_come_before_loading(
    slimc_opt, pipeline: str, expected: str, missing: str
) -> None:
    res = slimc_opt(missing, "-p", pipeline)
    assert res.rc == 1 and res.out == ""
    assert one_error_line(res.err).startswith(expected)


def test_debug_shows_traceback(slimc_opt) -> None:
    res = slimc_opt("x.py", "-p", "linear-quantt", "--debug")
    assert res.rc == 1 and "Traceback" in res.err
    assert res.err.rstrip().splitlines()[-1].startswith("slimc-opt: error: unknown pass")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["no/such/model_dir"], "input no/such/model_dir does not exist"),
        (["missing.py"], "input missing.py does not exist"),
        (["missing.pt2"], "input missing.pt2 does not exist"),
        ([], "no INPUT given"),
        (
            ["x.py", "--print-ir-after=linear-qaunt"],
            "--print-ir-after: unknown pass 'linear-qaunt' (did you",
        ),
    ],
)
def test_input_errors(slimc_opt, args: list[str], expected: str) -> None:
    res = slimc_opt(*args)
    assert res.rc == 1
    assert one_error_line(res.err).startswith(expected)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("nobuild.py", "has no function build()"),
        ("badreturn.py", "build() must return (nn.Module, example_inputs[, calib]), got int"),
        ("raises.py", "ValueError: no model today"),
        ("mlp.py:nope", "has no function nope()"),
    ],
)
def test_bad_case_files(slimc_opt, cases: Path, case: str, expected: str) -> None:
    res = slimc_opt(str(cases / case))
    assert res.rc == 1
    assert expected in one_error_line(res.err)


@pytest.mark.parametrize("pipeline", ["w8a8", "iter-smooth", "require<activation-stats>"])
def test_missing_calibration_data(slimc_opt, cases: Path, pipeline: str) -> None:
    res = slimc_opt(str(cases / "mlp.py"), "-p", pipeline)
    assert res.rc == 1
    assert "needs calibration data" in one_error_line(res.err)


def test_bad_model_dirs(slimc_opt, tmp_path: Path) -> None:
    res = slimc_opt(str(tmp_path), "-p", "w8a16")
    assert "has no config.json" in one_error_line(res.err)
    (tmp_path / "config.json").write_text("{not json")
    res = slimc_opt(str(tmp_path), "-p", "w8a16")
    assert res.rc == 1 and "cannot load" in one_error_line(res.err)
    bad = tmp_path / "file.bin"
    bad.write_bytes(b"\0")
    assert "cannot tell what" in one_error_line(slimc_opt(str(bad)).err)
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"not a zip archive")
    assert "is not a .pt2 archive" in one_error_line(slimc_opt(str(corrupt)).err)


def test_console_script_exit_code() -> None:
    exe = shutil.which("slimc-opt")
    cmd = [exe] if exe else [sys.executable, "-m", "slimc.tools.opt"]
    proc = subprocess.run(
        [*cmd, "missing.py", "-p", "fuse-quantized-linear"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("slimc-opt: error: pass 'fuse-quantized-linear' (position 1)")
    assert "Traceback" not in proc.stderr


# -- inputs that load ---------------------------------------------------------------------------------
def test_hf_model_dir_with_calibration(slimc_opt, tmp_path: Path) -> None:
    from tests.models import tiny_llama, tiny_tokenizer

    tiny_llama(seed=0, layers=2).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    res = slimc_opt(str(tmp_path), "-p", "w8a8", "--calib-samples", "2", "--no-loc")
    assert res.rc == 0, res.err
    assert res.out.startswith("// stage: fused\n")
    assert res.out.count("slimc.linear_w8a8(") == 14  # 7 linears x 2 layers; lm_head ignored
    assert "loc(" not in res.out


def test_hf_model_dir_calibrates_for_required_analyses(slimc_opt, tmp_path: Path) -> None:
    from tests.models import tiny_llama, tiny_tokenizer

    tiny_llama(seed=0, layers=2).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    res = slimc_opt(
        str(tmp_path), "-p", "require<activation-stats>", "--print-analyses", "--calib-samples", "2"
    )
    assert res.rc == 0, res.err
    assert "activation-stats: 9 linear inputs" in res.err


def test_case_without_pipeline_prints_canonical_ir(slimc_opt, cases: Path) -> None:
    res = slimc_opt(str(cases / "mlp.py"))
    assert res.rc == 0
    assert res.out.startswith(
        "// stage: aten\ngraph @forward(%x: f32[2, 8, 64]) -> (f32[2, 8, 64]) {"
    )
    assert res.out.count("aten.linear(") == 2


# -- debugging flags ----------------------------------------------------------------------------------
def test_bisect_limit_runs_only_first_pass(slimc_opt, cases: Path) -> None:
    res = slimc_opt(str(cases / "mlp.py"), "-p", "w4a16", "--bisect-limit=1")
    assert res.rc == 0
    assert res.out.startswith("// stage: qdq")
    assert "slimc.dequantize_affine(" in res.out and "linear_w4a16" not in res.out
    assert "BISECT: NOT running pass (2) fuse-quantized-linear" in res.err


def test_time_passes_and_statistics(slimc_opt, cases: Path) -> None:
    res = slimc_opt(
        str(cases / "mlp.py"), "-p", "canonicalize,w4a16", "--time-passes", "--pass-statistics"
    )
    assert res.rc == 0
    assert "Pass execution timing report" in res.err
    for name in ("canonicalize", "linear-quant{scheme=w4a16}", "fuse-quantized-linear", "Total"):
        assert re.search(rf"\(\s*[0-9.]+%\)  {re.escape(name)}\n", res.err), res.err
    assert "Pass statistics report" in res.err
    assert "  (2) quantized linears (w4a16)" in res.err
    assert "  (2) fused linears" in res.err
    assert "Pass execution timing report" not in res.out


def test_print_analyses_without_pipeline(slimc_opt, cases: Path) -> None:
    res = slimc_opt(str(cases / "llama.py"), "--print-analyses")
    assert res.rc == 0, res.err
    assert res.out.startswith("// stage: aten\n") and "linear-groups" not in res.out
    lines = res.err.splitlines()
    assert lines[0] == "linear-groups: 8 groups, 1 refused"
    assert "  norm-linear model.layers.0.input_layernorm -> q_proj,k_proj,v_proj" in lines
    assert "  ov model.layers.0.self_attn.v_proj -> o_proj  [32 -> 64 channels]" in lines
    assert "  norm-linear model.layers.1.post_attention_layernorm -> gate_proj,up_proj" in lines
    assert "  up-down model.layers.1.mlp.up_proj -> down_proj" in lines
    assert lines[-1] == (
        "  refused norm-linear at model.norm -> lm_head: weight lm_head.weight of lm_head is "
        "shared with aten.embedding in model.embed_tokens (tied weights)"
    )
    assert "activation-stats" not in res.err  # needs calibration: printed only when cached
    assert slimc_opt(str(cases / "llama.py")).err == ""


def test_print_analyses_names_the_experts_of_a_moe_model(slimc_opt, cases: Path) -> None:
    res = slimc_opt(str(cases / "moe.py"), "--print-analyses")
    assert res.rc == 0, res.err
    lines = res.err.splitlines()
    at = lines.index("experts: 2 MoE layers")
    assert lines[at + 1 : at + 5] == [
        "  model.layers.0.mlp: 8 experts, top-2, router model.layers.0.mlp.gate",
        "    up: model.layers.0.mlp.experts.gate_up_proj [8, 64, 64]",
        "    down: model.layers.0.mlp.experts.down_proj [8, 64, 32]",
        "    shared: model.layers.0.mlp.shared_expert.gate_proj, "
        "model.layers.0.mlp.shared_expert.up_proj, model.layers.0.mlp.shared_expert.down_proj, "
        "model.layers.0.mlp.shared_expert_gate",
    ]
    assert "experts" not in slimc_opt(str(cases / "llama.py"), "--print-analyses").err


def test_print_analyses_after_smoothing(slimc_opt, cases: Path) -> None:
    res = slimc_opt(
        str(cases / "llama_calib.py"), "-p", "iter-smooth", "--print-analyses", "--pass-statistics"
    )
    assert res.rc == 0, res.err
    assert "  (4) smoothed norm-linear groups" in res.err
    groups, stats = res.err.index("linear-groups: 8 groups"), res.err.index("activation-stats:")
    assert res.err.index("Pass statistics report") < groups < stats
    assert "activation-stats: 9 linear inputs" in res.err
    assert re.search(
        r"^  aten\.mul in model\.layers\.0\.post_attention_layernorm -> "
        r"model.layers.0.mlp.gate_proj,model.layers.0.mlp.up_proj: "
        r"absmax [0-9.e+-]+ \(max/median [0-9.]+\), tokens 32$",
        res.err,
        re.MULTILINE,
    )
    # a pipeline that drops the cached analyses: linear-groups recomputed on the quantized IR
    res = slimc_opt(str(cases / "llama_calib.py"), "-p", "iter-smooth,w8a16", "--print-analyses")
    assert res.rc == 0, res.err
    assert "linear-groups: 0 groups, 1 refused" in res.err  # only the float, tied lm_head is left
    assert "activation-stats" not in res.err


def test_print_ir_flags(slimc_opt, cases: Path) -> None:
    mlp, pipe = (
        str(cases / "mlp.py"),
        "canonicalize,linear-quant{scheme=w8a16},fuse-quantized-linear",
    )
    banners = re.compile(r"^// -----// IR Dump (.*) //----- //$", re.MULTILINE)
    res = slimc_opt(mlp, "-p", pipe, "--print-ir-after-all")
    assert banners.findall(res.out) == [
        "After canonicalize (1/3)",
        "After linear-quant{scheme=w8a16} (2/3)",
        "After fuse-quantized-linear (3/3)",
    ]
    res = slimc_opt(mlp, "-p", pipe, "--print-ir-before=linear-quant,fuse-quantized-linear")
    assert banners.findall(res.out) == [
        "Before linear-quant{scheme=w8a16} (2/3)",
        "Before fuse-quantized-linear (3/3)",
    ]
    res = slimc_opt(mlp, "-p", pipe, "--print-ir-before-all", "--print-ir-after=canonicalize")
    assert len(banners.findall(res.out)) == 4
    res = slimc_opt(mlp, "-p", pipe, "--print-ir-after-change")  # canonicalize changes nothing
    assert banners.findall(res.out) == [
        "After linear-quant{scheme=w8a16} (2/3)",
        "After fuse-quantized-linear (3/3)",
    ]
    res = slimc_opt(mlp, "-p", pipe, "--print-ir-after-change", "--print-ir-after=linear-quant")
    assert banners.findall(res.out) == ["After linear-quant{scheme=w8a16} (2/3)"]


def test_print_changed_diff(slimc_opt, cases: Path) -> None:
    res = slimc_opt(
        str(cases / "mlp.py"),
        "-p",
        "canonicalize,linear-quant{scheme=w8a16}",
        "--print-changed=diff",
    )
    assert res.rc == 0
    dump = res.out.split("// stage: qdq\ngraph", 1)[0]  # everything before the final IR
    assert dump.startswith(
        "// -----// IR Dump Diff After linear-quant{scheme=w8a16} (2/2) //----- //\n"
        "--- before\n+++ after\n@@ "
    )
    assert "IR Dump Diff After canonicalize" not in res.out
    assert "\n-// stage: aten\n+// stage: qdq\n" in dump
    assert re.search(r'^-  %fc1_weight = const "fc1.weight" : f32\[128, 64\]', dump, re.MULTILINE)
    assert re.search(r"^\+  %\w+ = slimc.dequantize_affine\(%fc1_weight_q,", dump, re.MULTILINE)
    assert re.search(
        r"^\+  %linear = aten.linear\(%x, %dequantize_affine\w*, %fc1_bias\)", dump, re.MULTILINE
    )


def test_track_error_reports_sqnr(slimc_opt, cases: Path) -> None:
    res = slimc_opt(
        str(cases / "llama.py"), "-p", "canonicalize,linear-quant{scheme=w4a16}", "--track-error"
    )
    assert res.rc == 0
    rows = dict(re.findall(r"^  (\S+)\s+(\S+)\s+\S+\s+\S+$", res.err, re.MULTILINE))
    assert rows["canonicalize"] == "inf"
    sqnr = float(rows["linear-quant{scheme=w4a16}"])
    assert 5.0 < sqnr < 60.0


# -- crash reproducer and -o -----------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Crash(Pass):
    """Fail on purpose (tests the crash reproducer)."""

    name = "test-crash"
    accepts = frozenset(Stage)

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        raise ValueError("deliberate crash")


@dataclass(frozen=True, kw_only=True)
class Untype(Pass):
    """Drop meta["val"] from the first linear (breaks a verifier invariant)."""

    name = "test-untype"
    accepts = frozenset(Stage)

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        import torch

        node = next(
            iter(program.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default))
        )
        node.meta.pop("val")
        return PassResult(changed=True)


def test_verify_each_and_failure_dumps(
    slimc_opt, cases: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry.PASSES, Untype.name, f"{__name__}:Untype")
    monkeypatch.setitem(registry.PASSES, Crash.name, f"{__name__}:Crash")
    mlp = str(cases / "mlp.py")
    res = slimc_opt(mlp, "-p", "canonicalize,test-untype")
    assert one_error_line(res.err).startswith(
        "test-untype (pass 2/2) failed: VerificationError: node has no meta['val'] (type) after "
        "test-untype"
    )
    assert slimc_opt(mlp, "-p", "canonicalize,test-untype", "--no-verify").rc == 0
    res = slimc_opt(mlp, "-p", "canonicalize,test-crash", "--print-ir-after-failure")
    assert res.rc == 1
    assert res.out.startswith(
        "// -----// IR Dump After Failure of test-crash (2/2) //----- //\n// stage: aten\n"
    )
    res = slimc_opt(mlp, "-p", "canonicalize,test-crash", "--print-ir-before=canonicalize")
    assert res.out.count("// -----// IR Dump") == 1  # no failure dump unless asked for


def test_crash_reproducer_round_trip(
    slimc_opt, cases: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry.PASSES, Crash.name, f"{__name__}:Crash")
    repro = tmp_path / "repro.pt2"
    res = slimc_opt(
        str(cases / "mlp.py"),
        "-p",
        "canonicalize,linear-quant{scheme=w4a16 group-size=32},test-crash,fuse-quantized-linear",
        f"--crash-reproducer={repro}",
    )
    assert res.rc == 1 and res.out == ""
    assert res.err.splitlines() == [
        "slimc-opt: error: test-crash (pass 3/4) failed: ValueError: deliberate crash",
        f"slimc-opt: note: reproduce with: slimc-opt {repro}",
    ]
    assert repro.is_file()

    again = slimc_opt(str(repro))  # the stored pipeline: test-crash,fuse-quantized-linear
    assert again.rc == 1
    assert one_error_line(again.err) == "test-crash (pass 1/2) failed: ValueError: deliberate crash"

    # the reproducer holds the QDQ program from before the failing pass, schemes included
    qdq = slimc_opt(str(repro), "-p", "canonicalize")
    assert qdq.rc == 0 and qdq.out.startswith("// stage: qdq\n")
    assert qdq.out.count("slimc.dequantize_affine(") == 2 and 'loc("fc1")' in qdq.out
    fused = slimc_opt(str(repro), "-p", "fuse-quantized-linear")
    assert fused.rc == 0, fused.err
    assert fused.out.count("slimc.linear_w4a16(") == 2 and "group_size=32" in fused.out


def test_output_pt2_reads_back_identically(slimc_opt, cases: Path, tmp_path: Path) -> None:
    out = tmp_path / "llama_w4a16.pt2"
    first = slimc_opt(str(cases / "llama.py"), "-p", "w4a16{group-size=32}", "-o", str(out))
    assert first.rc == 0, first.err
    assert out.is_file()
    again = slimc_opt(str(out))
    assert again.rc == 0, again.err
    assert again.out == first.out  # names, order, types (dynamic dims too) and locations
    fail = slimc_opt(str(out), "-p", "linear-quant")
    assert "runs on the aten/qdq stage, but the program is at the fused stage" in one_error_line(
        fail.err
    )


def test_plain_torch_export_pt2(slimc_opt, tmp_path: Path) -> None:
    import torch

    from tests.models import tiny_mlp

    model = tiny_mlp(seed=0)
    path = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(model, model.example_inputs()), str(path))
    res = slimc_opt(str(path), "-p", "w8a16")
    assert res.rc == 0, res.err
    assert res.out.startswith("// stage: fused\ngraph @forward(%x: f32[2, 8, 64])")
    assert res.out.count("slimc.linear_w8a16(") == 2 and 'loc("fc2")' in res.out
