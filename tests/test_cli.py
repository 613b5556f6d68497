"""The `slimc` CLI: quant / eval on a tiny model directory, errors as one line, real-model run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimc.tools.cli import main
from tests.models import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_quant_w8a8_saves_loadable_checkpoint_and_prints_table(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "w8a8"
    rc = main(
        [
            "quant",
            "--model",
            str(model_dir),
            "--quant-type",
            "w8a8",
            "--calib-samples",
            "4",
            "--eval",
            "1",
            "--save",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = [line.split() for line in captured.out.splitlines() if line.startswith(("fp32", "w8a8"))]
    assert [r[0] for r in rows] == ["fp32", "w8a8"]
    assert float(rows[1][1]) > 0 and rows[1][2].endswith("%")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded(torch.randint(0, 128, (1, 8))).logits.shape == (1, 8, 128)


def test_quant_pt2_then_eval(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "w4a16"
    rc = main(
        [
            "quant",
            "--model",
            str(model_dir),
            "--quant-type",
            "w4a16",
            "--group-size",
            "32",
            "--format",
            "pt2",
            "--save",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (out / "model.pt2").is_file()
    capsys.readouterr()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 120))
    assert main(["eval", "--model", str(out), "--text", str(text), "--windows", "1"]) == 0
    assert capsys.readouterr().out.startswith("PPL ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["quant", "--model", "/nonexistent", "--quant-type", "w8a16", "--save", "X"],
            "model directory /nonexistent does not exist",
        ),
        (
            ["quant", "--quant-type", "w8a8", "--group-size", "64", "--save", "X"],
            "scheme 'w8a8' quantizes weights per channel",
        ),
        (["quant", "--quant-type", "w8a16"], "nothing to do"),
        (["eval", "--model", "/nonexistent"], "does not exist"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimc: error: ") and message in err[0]


def test_unwritable_save_path_leaves_nothing(model_dir, capsys) -> None:
    target = "/proc/slimc-out"
    assert (
        main(["quant", "--model", str(model_dir), "--quant-type", "w8a16", "--save", target]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("slimc: error: ") and "Traceback" not in "\n".join(err)
    assert not Path(target).exists()


def test_debug_shows_the_traceback(capsys) -> None:
    from slimc.errors import UserError

    with pytest.raises(UserError):
        main(
            ["--debug", "quant", "--model", "/nonexistent", "--quant-type", "w8a16", "--save", "X"]
        )


@pytest.mark.slow
def test_smollm2_w8a16_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "smollm2-w8a16"
    assert main(["quant", "--quant-type", "w8a16", "--eval", "2", "--save", str(out)]) == 0
    rows = {
        line.split()[0]: line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("fp32", "w8a16"))
    }
    fp32, q = float(rows["fp32"][1]), float(rows["w8a16"][1])
    assert abs(q / fp32 - 1) < 0.01, (fp32, q)
    assert main(["eval", "--model", str(out), "--windows", "2"]) == 0
    reloaded = float(capsys.readouterr().out.split()[1])
    assert abs(reloaded / q - 1) < 0.005, (q, reloaded)


def test_occupied_save_dir_is_refused_before_quantizing(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    argv = ["quant", "--model", str(model_dir), "--quant-type", "w8a16", "--save", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "pipeline:" not in err  # refused before loading the model
    assert (out / "keep.txt").read_text() == "user data"
    assert main([*argv, "--overwrite"]) == 1  # --overwrite replaces only a model directory
    assert "does not look like a model directory" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    assert main(argv) == 0  # an empty directory is written
    assert (out / "config.json").exists()
    assert main([*argv, "--overwrite"]) == 0  # and the model it holds replaced


def test_anti_outlier_smooths_before_quantizing(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "w8a8-iter"
    argv = ["quant", "--model", str(model_dir), "--quant-type", "w8a8"]
    argv += ["--anti-outlier", "iter-smooth", "--calib-samples", "4", "--eval", "1"]
    rc = main([*argv, "--save", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "pipeline: iter-smooth{" in captured.err
    assert any(line.startswith("w8a8 + iter-smooth") for line in captured.out.splitlines())
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded(torch.randint(0, 128, (1, 8))).logits.shape == (1, 8, 128)


@pytest.mark.parametrize("quant_type", ["w8a8", "w8a8-dynamic", "w4a16", "w4a8", "w8a16"])
def test_every_anti_outlier_pass_composes_with_every_scheme(quant_type: str) -> None:
    from slimc.pass_manager import PassManager
    from slimc.registry import ANTI_OUTLIER
    from slimc.tools.cli import build_pipeline, make_parser

    for name in ANTI_OUTLIER:
        args = make_parser().parse_args(
            ["quant", "--quant-type", quant_type, "--anti-outlier", name, "--eval", "1"]
        )
        steps = PassManager.parse(build_pipeline(args)).steps
        assert steps[0].name == name and steps[-2].scheme == quant_type
        if name == "flex-smooth-quant":  # searched against the activation quantizer used later
            want = "per-tensor" if quant_type == "w8a8" else "per-token"
            assert steps[0].act_quant == want
        if name in ("awq", "flex-awq-ssz"):  # ... and against the final weight quantizer
            bits = steps[0].bits if name == "awq" else steps[0].weight_bits
            assert bits == (4 if quant_type.startswith("w4") else 8)
            assert steps[0].symmetric == steps[-2].quant_scheme().weight.symmetric
        if name == "flex-awq-ssz":
            want = {"w8a8": "per-tensor", "w4a16": "none", "w8a16": "none"}.get(quant_type)
            assert steps[0].act_quant == (want or "per-token")


@pytest.mark.parametrize("method", ["rtn", "gptq", "ssz", "autoround"])
@pytest.mark.parametrize("quant_type", ["w8a8", "w4a16", "w4a4"])
def test_weight_method_and_rotation_build_the_pipeline(method: str, quant_type: str) -> None:
    from slimc.pass_manager import PassManager
    from slimc.tools.cli import build_pipeline, make_parser

    argv = ["quant", "--quant-type", quant_type, "--weight-method", method, "--group-size", "32"]
    if quant_type != "w4a16":
        argv = argv[:-2]
    args = make_parser().parse_args([*argv, "--rotation", "quarot", "--anti-outlier", "awq"])
    steps = PassManager.parse(build_pipeline(args)).steps
    names = [s.name for s in steps]
    quantizer = "linear-quant" if method == "rtn" else method
    assert names == ["quarot", "awq", quantizer, "fuse-quantized-linear"]
    assert steps[2].scheme == quant_type
    assert steps[2].group_size == (32 if quant_type == "w4a16" else -1)


def test_gptq_with_quarot_saves_compressed_tensors_that_transformers_loads(
    model_dir, tmp_path, capsys
) -> None:
    out = tmp_path / "w4a16-quarot-gptq"
    argv = ["quant", "--model", str(model_dir), "--quant-type", "w4a16", "--group-size", "32"]
    argv += ["--rotation", "quarot", "--weight-method", "gptq", "--calib-samples", "8"]
    rc = main([*argv, "--eval", "1", "--save", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "pipeline: quarot{" in captured.err and "gptq{" in captured.err
    assert "saved compressed-tensors model" in captured.err
    row = next(r for r in captured.out.splitlines() if r.startswith("w4a16 + quarot + gptq"))
    assert float(row.split()[5]) > 0
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded(torch.randint(0, 128, (1, 8))).logits.shape == (1, 8, 128)


def test_format_auto_falls_back_to_pt2_when_compressed_tensors_cannot_hold_it(capsys) -> None:
    import slimc
    from slimc.tools.cli import choose_format

    model = tiny_llama(layers=1)
    calib = [
        torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    plain = slimc.compile(model, "w4a4")
    assert choose_format(plain, "auto") == "compressed-tensors"
    shifted = slimc.compile(model, "iter-smooth{shift=true},w8a8-dynamic", calib=calib)
    assert choose_format(shifted, "auto") == "pt2"
    assert "saving as pt2: asymmetric smoothing added a bias" in capsys.readouterr().err
    assert (
        choose_format(shifted, "compressed-tensors") == "compressed-tensors"
    )  # asked: refused later


@pytest.mark.parametrize(("quant_type", "bits"), [("w4a4", 4), ("w8a8-dynamic", 8), ("w4a16", 4)])
def test_adapt_rotation_learns_against_the_schemes_activation_quantizer(
    quant_type: str, bits: int
) -> None:
    from slimc.pass_manager import PassManager
    from slimc.tools.cli import build_pipeline, make_parser

    args = make_parser().parse_args(
        ["quant", "--quant-type", quant_type, "--rotation", "adapt-rotation", "--eval", "1"]
    )
    steps = PassManager.parse(build_pipeline(args)).steps
    assert steps[0].name == "adapt-rotation" and steps[0].quant_bits == bits
