"""A calibrating run records finished layers in a work directory; a killed run resumes bitwise."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slimc
from slimc.errors import UserError
from slimc.nn import QuantizedLinear
from slimc.quant import linear_engine
from slimc.quant.weight_method import Replay
from slimc.tools.cli import main
from slimc.work_dir import LayerJournal, WorkDir, fingerprint_tensors
from tests.models import tiny_llama, tiny_tokenizer

FINGERPRINT = {"model": "m", "pipeline": "p", "calibration": "c"}
CALIB = [
    torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)
]


def _quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
        for k, v in m.state_dict().items()
    }


def test_work_dir_refuses_an_existing_directory_without_resume(tmp_path: Path) -> None:
    WorkDir.open(tmp_path / "w", FINGERPRINT, resume=False)
    with pytest.raises(UserError, match="add --resume"):
        WorkDir.open(tmp_path / "w", FINGERPRINT, resume=False)
    assert WorkDir.open(tmp_path / "w", FINGERPRINT, resume=True).path == tmp_path / "w"


def test_work_dir_of_another_run_is_refused_naming_what_differs(tmp_path: Path) -> None:
    WorkDir.open(tmp_path / "w", FINGERPRINT, resume=False)
    other = {**FINGERPRINT, "pipeline": "q"}
    with pytest.raises(UserError, match=r"another run \(its pipeline differ"):
        WorkDir.open(tmp_path / "w", other, resume=True)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a slimc work directory"):
        WorkDir.open(tmp_path / "plain", FINGERPRINT, resume=True)


def test_work_dir_that_cannot_be_created_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create work directory .*file/w"):
        WorkDir.open(tmp_path / "file" / "w", FINGERPRINT, resume=False)


def test_journal_records_whole_layers_in_order(tmp_path: Path) -> None:
    journal = WorkDir.open(tmp_path / "w", FINGERPRINT, resume=False).journal("gptq")
    journal.record("model.layers.0", {"a": torch.arange(4)})
    assert torch.equal(journal.finished("model.layers.0")["a"], torch.arange(4))
    assert journal.finished("model.layers.1") is None
    assert journal.count_finished(["model.layers.0", "model.layers.1"]) == 1
    assert not list(journal.path.glob("*.tmp"))
    assert fingerprint_tensors([torch.ones(2)]) != fingerprint_tensors([torch.ones(3)])


@pytest.mark.parametrize("pipeline", ["w8a8", "autoround{iters=3 seqlen=0}"])  # GPTQ: killed below
def test_resumed_compile_replays_finished_layers_bitwise(
    pipeline: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    work = WorkDir.open(tmp_path / "w", FINGERPRINT, resume=False)
    whole = slimc.compile(
        tiny_llama(layers=4), pipeline, calib=CALIB, progress=False, work_dir=work
    )
    records = sorted(work.path.glob("*/*.safetensors"))
    assert [p.stem for p in records] == [f"model.layers.{i}" for i in range(4)]
    for p in records[2:]:  # as if the run had been killed in layer 2
        p.unlink()
    rounded: list[str] = []
    original = linear_engine.LinearQuantEngine.rewrite

    def spy(self, program, node, scheme, static_qparams, collected=None, *, method):  # type: ignore[no-untyped-def]
        if not isinstance(method, Replay):
            rounded.append(str(node.meta.get("slimc_loc")))
        return original(self, program, node, scheme, static_qparams, collected, method=method)

    monkeypatch.setattr(linear_engine.LinearQuantEngine, "rewrite", spy)
    again = WorkDir.open(tmp_path / "w", FINGERPRINT, resume=True)
    with caplog.at_level(logging.WARNING):
        resumed = slimc.compile(
            tiny_llama(layers=4), pipeline, calib=CALIB, progress=False, work_dir=again
        )
    assert "resuming at layer 3 of 4" in caplog.text
    assert rounded and all(loc.startswith(("model.layers.2", "model.layers.3")) for loc in rounded)
    want, got = _quantized_state(whole), _quantized_state(resumed)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize(
    "pipeline",
    [
        "flex-smooth-quant,linear-quant{scheme=w8a8}",
        "flex-awq-ssz{group-size=32},linear-quant{scheme=w4a16 group-size=32}",
        "awq{group-size=32},linear-quant{scheme=w4a16 group-size=32}",
    ],
)
def test_resumed_smoothing_search_refolds_recorded_scales_bitwise(
    pipeline: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run killed in a searching smoothing pass: the layers it finished are not searched
    again (their recorded scales are folded), and the result equals an uninterrupted run's."""
    work = WorkDir.open(tmp_path / "w", FINGERPRINT, resume=False)
    whole = slimc.compile(
        tiny_llama(layers=4), pipeline, calib=CALIB, progress=False, work_dir=work
    )
    smoothing = pipeline.split("{")[0].split(",")[0]
    for p in work.path.glob("*/*.safetensors"):  # as if killed while smoothing layer 2
        if p.parent.name != smoothing or p.stem >= "model.layers.2":
            p.unlink()
    searched: list[str] = []  # a layer is recorded once its search is done
    original = LayerJournal.record

    def spy(self: LayerJournal, label: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.name == smoothing:
            searched.append(label)
        original(self, label, tensors)

    monkeypatch.setattr(LayerJournal, "record", spy)
    again = WorkDir.open(tmp_path / "w", FINGERPRINT, resume=True)
    with caplog.at_level(logging.WARNING):
        resumed = slimc.compile(
            tiny_llama(layers=4), pipeline, calib=CALIB, progress=False, work_dir=again
        )
    assert f"{smoothing}: resuming at layer 3 of 4" in caplog.text
    assert searched == ["model.layers.2", "model.layers.3"]
    want, got = _quantized_state(whole), _quantized_state(resumed)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def _model_dir(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    path = root / "model"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _quant(model: Path, save: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "slimc.tools.cli", "quant", "--model", str(model)]
    argv += ["--quant-type", "w4a16", "--group-size", "32", "--weight-method", "gptq"]
    argv += ["--calib-samples", "8", "--calib-seq-len", "96", "--save", str(save), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_gptq_run_killed_halfway_resumes_to_the_same_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model_dir(tmp_path)
    reference = _quant(model, tmp_path / "reference")
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    assert not (tmp_path / "reference.work").exists()  # removed after the save

    save = tmp_path / "resumed"
    journal = tmp_path / "resumed.work" / "gptq"
    victim = _quant(model, save)
    deadline = time.monotonic() + 600
    while not list(journal.glob("*.safetensors")):  # the first layer is finished
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    finished = len(list(journal.glob("*.safetensors")))
    assert victim.returncode == -signal.SIGKILL and 1 <= finished < 5 and not save.exists()

    argv = ["quant", "--model", str(model), "--quant-type", "w4a16", "--group-size", "32"]
    argv += ["--weight-method", "gptq", "--calib-samples", "8", "--calib-seq-len", "96"]
    assert main([*argv, "--save", str(save)]) == 1  # without --resume: refused, nothing lost
    assert "add --resume" in capsys.readouterr().err
    assert len(list(journal.glob("*.safetensors"))) == finished
    resumed = _quant(model, save, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming at layer {finished + 1} of 5" in err
    assert not (tmp_path / "resumed.work").exists()
    files = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert files == sorted(p.name for p in save.iterdir())
    for name in files:
        assert (save / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_failed_save_keeps_recorded_layers_and_a_failed_check_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from slimc.export import compressed_tensors

    model = tmp_path / "tiny"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    argv = ["quant", "--model", str(model), "--quant-type", "w8a8", "--calib-samples", "2"]
    save = tmp_path / "new" / "out"
    assert main([*argv, "--ignore", "typo", "--save", str(save)]) == 1  # before any layer
    assert not (tmp_path / "new").exists()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise UserError("disk full")

    monkeypatch.setattr(compressed_tensors, "save_compressed_tensors", disk_full)
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--save", str(save)]) == 1
    assert "--resume continues" in caplog.text
    assert len(list((tmp_path / "new" / "out.work").glob("*/model.layers.*.safetensors"))) == 2
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--save", str(save), "--resume"]) == 0
    assert "linear-quant: all 2 layers are recorded: replaying them" in caplog.text
    assert (save / "config.json").exists() and not (tmp_path / "new" / "out.work").exists()


def test_a_record_without_what_the_pass_wrote_is_another_runs() -> None:
    from slimc.quant.replay import recorded_tensor

    record = {"g:scale": torch.ones(2)}
    assert torch.equal(recorded_tensor(record, "g", "scale"), torch.ones(2))
    with pytest.raises(UserError, match=r"no record of g \(g:choice\): it is of another run"):
        recorded_tensor(record, "g", "choice")
