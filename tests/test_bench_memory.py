"""tools/bench_memory.py: GNU time parsing, the cap refusal, the rendered section and one real run."""

from __future__ import annotations

import json
import shutil

import pytest

from slimc.errors import UserError
from slimc.tools import _memory_cap, bench_memory
from slimc.tools._memory_cap import MemoryCap
from tests.models import tiny_llama, tiny_tokenizer

TIME_V = """\
\tCommand being timed: "python3 -m slimc.tools.cli quant"
\tUser time (seconds): 10.20
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.50
\tMaximum resident set size (kbytes): 939816
\tExit status: 0
"""


def test_gnu_time_report_gives_peak_rss_wall_time_and_exit_status() -> None:
    parsed = bench_memory.parse_time_v(TIME_V)
    assert parsed == {"peak_rss_kib": 939816, "wall_s": 3723.5, "exit_status": 0}
    killed = bench_memory.parse_time_v("\tCommand terminated by signal 9\n\tExit status: 0\n")
    assert killed["signal"] == 9


def test_stage_times_come_from_the_quant_summary() -> None:
    out = "w8a8  12.1\ntime per stage: load 6.9 s, capture+passes 6.0 s, save 1.1 s\npeak RSS: 9 MB"
    assert bench_memory.parse_stages(out) == {"load": 6.9, "capture+passes": 6.0, "save": 1.1}
    assert bench_memory.parse_stages("no summary") == {}


def test_preset_and_arguments_after_double_dash() -> None:
    parse = bench_memory.make_parser().parse_args
    args = parse(["--model", "m", "--preset", "w4a16-gptq"])
    assert bench_memory.quant_arguments(args)[-4:] == [
        "--weight-method",
        "gptq",
        "--calib-samples",
        "16",
    ]
    args = parse(["--model", "m", "--", "quant", "--quant-type", "w8a16"])
    assert bench_memory.quant_arguments(args) == ["--quant-type", "w8a16"]
    args = parse(["--model", "m", "--preset", "w8a8-dynamic", "--", "--format", "pt2"])
    label = bench_memory._scheme_label(args, bench_memory.quant_arguments(args))
    assert label == "w8a8-dynamic --format pt2"  # a row of its own beside the bare preset's
    with pytest.raises(UserError, match="--save after --"):
        bench_memory.quant_arguments(parse(["--model", "m", "--", "--save", "x"]))
    with pytest.raises(UserError, match="give --preset"):
        bench_memory.quant_arguments(parse(["--model", "m"]))


def test_capped_run_is_refused_with_the_reason_when_no_cap_can_be_made(
    tmp_path, monkeypatch, capsys
) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"0" * 1000)
    monkeypatch.setattr(_memory_cap, "find_memory_cap", lambda limit: (None, ["no cgroup here"]))
    argv = ["--model", str(tmp_path), "--preset", "w8a8", "--cap-fraction", "0.4"]
    assert bench_memory.main([*argv, "--out", str(tmp_path / "b.md")]) == 1
    err = capsys.readouterr().err
    assert "--cap-fraction: cannot cap memory on this machine: no cgroup here" in err
    assert not (tmp_path / "b.md").exists()


def test_v1_child_cgroup_gets_the_limit_and_reports_its_peak(tmp_path) -> None:
    parent = tmp_path / "cg"
    parent.mkdir()
    cap = MemoryCap("cgroup-v1", 400 * 2**20, parent)
    cap.make("bench")
    child = parent / "bench"
    assert (child / "memory.limit_in_bytes").read_text() == str(400 * 2**20)
    (child / "memory.max_usage_in_bytes").write_text("12345\n")
    (child / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert cap.usage() == {"cgroup_peak_bytes": 12345, "oom_kills": 1}
    assert "400 MiB via cgroup-v1" in cap.describe()


@pytest.mark.skipif(shutil.which("time") is None, reason="needs GNU time")
def test_uncapped_run_writes_a_tool_check_row_between_the_markers(tmp_path, capsys) -> None:
    model = tmp_path / "tiny"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{bench_memory.BEGIN}\nold\n{bench_memory.END}\n\ntail\n")
    cache = tmp_path / "cache.json"
    argv = ["--model", str(model), "--preset", "w8a8-dynamic", "--tool-check", "--threads", "1"]
    argv += ["--out", str(doc), "--cache", str(cache)]
    before = doc.read_text()
    with pytest.raises(SystemExit, match="is missing"):  # the section's rows would be lost
        bench_memory.main(argv)
    assert doc.read_text() == before
    cache.write_text("{}")
    assert bench_memory.main(argv) == 0, capsys.readouterr().err
    (row,) = json.loads(cache.read_text()).values()
    assert row["exit_status"] == 0 and row["peak_rss_kib"] > 50_000
    assert 0 < row["peak_anon_kib"] <= row["peak_rss_kib"]
    assert row["checkpoint_bytes"] == sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert set(row["stages"]) == {"load", "capture+passes", "save"} and row["saved_bytes"] > 0
    text = doc.read_text()
    assert "old" not in text and text.endswith("\n\ntail\n")
    assert "## Engine: memory and time at model sizes" in text
    assert "(*tool check*, not a result)" in text and "w8a8-dynamic" in text
    assert text.count(bench_memory.BEGIN) == 1
