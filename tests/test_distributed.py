"""Calibration across ranks (torchrun, gloo on CPU): statistics reduce to one process's, the CLI
writes the same checkpoint, refuses passes that cannot split, and stops when a rank is lost."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from slimc import distributed
from slimc.compiler import check_ranks_supported
from slimc.errors import UserError
from slimc.pass_manager import PassManager
from tests.distributed_reductions import batches, observe
from tests.test_resume import _model_dir

TESTS = Path(__file__).resolve().parent


def _torchrun(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node 2 argv...` (a free port, one thread per rank)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", *argv]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=300)


def _ranks(monkeypatch: pytest.MonkeyPatch, rank: int, size: int) -> None:
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: size)


def test_one_process_is_one_rank_and_reductions_are_identities() -> None:
    assert not distributed.active()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    t = torch.tensor([1.0, -2.0])
    assert distributed.reduce_sum(t) is t
    assert distributed.reduce_count(5) == 5
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert not distributed.init_from_environment(timeout_s=60)  # WORLD_SIZE unset: nothing joined


def test_each_rank_takes_every_nth_sample_and_needs_one(monkeypatch: pytest.MonkeyPatch) -> None:
    _ranks(monkeypatch, rank=1, size=3)
    assert distributed.shard(list(range(8))) == [1, 4, 7]
    with pytest.raises(UserError, match="2 calibration samples cannot be split across 3 ranks"):
        distributed.shard([0, 1])


def test_passes_whose_search_reads_one_rank_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fine = "smooth-quant,iter-smooth,gptq{scheme=w4a16},ssz{scheme=w8a8},linear-quant{scheme=w8a8}"
    check_ranks_supported(PassManager.parse(fine))  # one process: nothing refused
    _ranks(monkeypatch, rank=0, size=2)
    check_ranks_supported(PassManager.parse(fine))
    for pipeline in (
        "flex-smooth-quant,linear-quant{scheme=w8a8}",
        "awq,linear-quant{scheme=w4a16}",
        "autoround{scheme=w4a16}",
        "linear-quant{scheme=w4a16 only=*q_proj sensitive-fraction=0.5}",
    ):
        first = pipeline.split("{")[0].split(",")[0]
        with pytest.raises(UserError, match=f"{first}.* cannot calibrate across 2 ranks"):
            check_ranks_supported(PassManager.parse(pipeline))
    check_ranks_supported(PassManager.parse("linear-quant{scheme=w8a8-dynamic}"))  # no data


@pytest.mark.slow
def test_statistics_reduced_over_two_ranks_equal_one_process_over_all_samples(
    tmp_path: Path,
) -> None:
    out = tmp_path / "reduced.pt"
    run = _torchrun(str(TESTS / "distributed_reductions.py"), str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out)
    want = observe(batches())  # one process, every batch
    assert got["shard"] == [float(x[0, 0]) for x, _ in batches()[0::2]]  # rank 0: batches 0, 2
    for name in ("minmax", "minmax_channel"):  # extremes: exact
        assert all(torch.equal(g, w) for g, w in zip(got[name], want[name], strict=True)), name
    assert all(
        torch.allclose(g, w) for g, w in zip(got["minmax_mean"], want["minmax_mean"], strict=True)
    )
    lo, hi, hist, clip = got["histogram"]
    assert (float(lo), float(hi)) == (float(want["histogram"][0]), float(want["histogram"][1]))
    assert float(hist.sum()) == 4 * 6 * 16
    assert torch.equal(hist, want["histogram"][2])  # bins on one grid merge exactly
    assert clip == want["histogram"][3]
    torch.testing.assert_close(got["hessian"][0], want["hessian"][0], rtol=1e-5, atol=1e-5)
    assert got["hessian"][1] == want["hessian"][1] == 24
    rows, hessians = got["experts"]
    assert rows == want["experts"][0] == [10, 10, 0, 4]  # expert 3: rank 1's rows only
    assert hessians.keys() == want["experts"][1].keys() == {0, 1, 3}
    for expert, hessian in hessians.items():
        torch.testing.assert_close(hessian, want["experts"][1][expert], rtol=1e-5, atol=1e-5)
    for g, w in zip(got["channels"], want["channels"], strict=True):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        else:
            assert g == pytest.approx(w, rel=1e-12)


def _quant_argv(model: Path, save: Path, *extra: str) -> list[str]:
    argv = ["quant", "--model", str(model), "--calib-samples", "8", "--calib-seq-len", "96"]
    return [*argv, "--save", str(save), *extra]


def _one_process(*argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "slimc.tools.cli", *argv]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def _tensors(path: Path) -> dict[str, Any]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("observer", ["minmax", "histogram"])
def test_two_ranks_write_the_checkpoint_one_process_writes(tmp_path: Path, observer: str) -> None:
    model = _model_dir(tmp_path)
    static = ("--quant-type", "w8a8", "--observer", observer, "--anti-outlier", "smooth-quant")
    _one_process(*_quant_argv(model, tmp_path / "one", *static))
    run = _torchrun("-m", "slimc.tools.cli", *_quant_argv(model, tmp_path / "two", *static))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "calibrating on 2 ranks" in run.stderr
    for rank in (0, 1):  # each rank says what it held
        assert f"rank {rank} of 2: peak RSS" in run.stderr
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    for name, value in one.items():  # maxima and histograms reduce exactly: the same bits
        assert torch.equal(two[name], value), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "one", "two"]  # no work dirs


@pytest.mark.slow
def test_two_ranks_gptq_hessians_give_nearly_the_same_codes(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    gptq = ("--quant-type", "w8a8", "--weight-method", "gptq")
    _one_process(*_quant_argv(model, tmp_path / "one", *gptq))
    run = _torchrun("-m", "slimc.tools.cli", *_quant_argv(model, tmp_path / "two", *gptq))
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    codes = [n for n, v in one.items() if v.dtype == torch.int8 and n.endswith(".weight")]
    assert codes
    changed = total = 0
    for name in codes:
        step = (one[name].int() - two[name].int()).abs()
        assert int(step.max()) <= 1, name  # a Hessian summed in another order: ties round apart
        changed += int((step > 0).sum())
        total += step.numel()
    assert changed / total < 0.01
    for name in (n for n in one if n.endswith("input_scale")):
        torch.testing.assert_close(two[name], one[name], rtol=0.02, atol=0)


@pytest.mark.slow
def test_a_pass_that_cannot_split_is_refused_before_loading(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    argv = _quant_argv(model, tmp_path / "out", "--quant-type", "w8a8")
    run = _torchrun("-m", "slimc.tools.cli", *argv, "--anti-outlier", "flex-smooth-quant")
    assert run.returncode != 0
    assert "flex-smooth-quant cannot calibrate across 2 ranks" in run.stderr
    assert "Loading weights" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "reason"),
    [("die", "another rank stopped"), ("hang", "Timed out")],
)
def test_a_lost_rank_stops_the_others_with_an_error_and_nothing_written(
    fault: str, reason: str, tmp_path: Path
) -> None:
    model = _model_dir(tmp_path)
    argv = _quant_argv(model, tmp_path / "out", "--quant-type", "w8a8", "--dist-timeout", "10")
    fail = {"SLIMC_FAULT": fault, "SLIMC_FAULT_RANK": "1", "SLIMC_FAULT_AT": "6"}
    start = time.monotonic()
    run = _torchrun(str(TESTS / "distributed_fault.py"), *argv, env=fail)
    assert time.monotonic() - start < 120  # not the default 30-minute wait
    assert run.returncode != 0
    assert "slimc: error: rank 0 of 2:" in run.stderr and reason in run.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    # a rank that is killed cannot clean up: the next distributed run removes its directory
    assert left in (["model"], ["model", "out.work.rank1"]), left


@pytest.mark.slow
def test_two_ranks_count_each_experts_tokens_over_both(tmp_path: Path) -> None:
    from tests.models import tiny_tokenizer
    from tests.test_moe_capture import tiny_moe

    model = tmp_path / "moe"
    tiny_moe("Qwen3Moe").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    gptq = ("--quant-type", "w4a16", "--group-size", "16", "--weight-method", "gptq")
    gptq += ("--format", "pt2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one_argv = ["-m", "slimc.tools.cli", "-v", *_quant_argv(model, tmp_path / "one", *gptq)]
    one = subprocess.run(
        [sys.executable, *one_argv], env=env, capture_output=True, text=True, timeout=300
    )
    two = _torchrun("-m", "slimc.tools.cli", "-v", *_quant_argv(model, tmp_path / "two", *gptq))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]

    def counts(stderr: str) -> list[str]:
        lines = stderr.splitlines()
        return [line.split("INFO ")[-1] for line in lines if "tokens per expert" in line]

    assert counts(one.stderr) and counts(two.stderr) == counts(one.stderr)  # rank 0 logs, summed
    assert (tmp_path / "two" / "model.pt2").is_file()
