"""`slimc quant`'s summary: wall time per stage and the process's peak RSS after the PPL table."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import pytest

from slimc.tools.cli import main
from tests.models import tiny_llama, tiny_tokenizer

STAGE = re.compile(r"([a-z0-9+]+) (\d+\.\d) s")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def summary_of(out: str) -> tuple[dict[str, float], int]:
    """The stages and seconds of the `time per stage:` line and the KiB of the `peak RSS:` line."""
    lines = out.splitlines()
    (times,) = [line for line in lines if line.startswith("time per stage: ")]
    (rss,) = [line for line in lines if line.startswith("peak RSS: ")]
    stages = {name: float(s) for name, s in STAGE.findall(times.removeprefix("time per stage: "))}
    match = re.fullmatch(r"peak RSS: (\d+) MB \((\d+) KiB\)", rss)
    assert match, rss
    assert abs(int(match[1]) - int(match[2]) / 1024) <= 0.5
    return stages, int(match[2])


def test_summary_names_every_stage_and_the_peak_rss(model_dir, tmp_path, capsys) -> None:
    argv = ["quant", "--model", str(model_dir), "--quant-type", "w8a8-dynamic"]
    rc = main([*argv, "--eval", "1", "--save", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    stages, kib = summary_of(captured.out)
    assert list(stages) == ["load", "eval", "capture+passes", "save"]
    assert all(s >= 0 for s in stages.values()) and stages["load"] > 0
    # this process's own peak, read after the run: the summary cannot exceed it and is not zero
    assert 0 < kib <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the PPL table is still printed before it
    table = captured.out.split("time per stage:")[0]
    assert [r.split()[0] for r in table.splitlines() if r.startswith(("fp32", "w8a8"))] == [
        "fp32",
        "w8a8-dynamic",
    ]


def test_summary_without_eval_lists_no_eval_stage(model_dir, tmp_path, capsys) -> None:
    argv = ["quant", "--model", str(model_dir), "--quant-type", "w8a8", "--calib-samples", "2"]
    rc = main([*argv, "--save", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    stages, kib = summary_of(captured.out)
    assert list(stages) == ["load", "capture+passes", "save"] and kib > 0
