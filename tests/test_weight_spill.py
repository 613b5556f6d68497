"""Tensors passes write move to memory-mapped files as layers finish; results and saves do not change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimc
from slimc import weight_spill
from slimc.export import save
from slimc.work_dir import WorkDir
from tests.models import tiny_llama

CALIB = [
    torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)
]
IDS = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def spill_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weight_spill, "MIN_SPILL_BYTES", 1)  # tiny models: spill every tensor


@pytest.mark.parametrize("pipeline", ["w8a8-dynamic", "w8a8", "gptq{scheme=w4a16 group-size=16}"])
def test_spilled_run_computes_and_saves_what_an_in_memory_run_does(
    pipeline: str, tmp_path: Path
) -> None:
    model = tiny_llama(layers=3)
    kept = slimc.compile(model, pipeline, calib=CALIB, progress=False)
    work = WorkDir.open(tmp_path / "work", {"run": pipeline}, resume=False)
    spilled = slimc.compile(model, pipeline, calib=CALIB, progress=False, work_dir=work)
    area = spilled.slimc_program.context.spill
    assert area is not None and area.bytes_spilled > 0
    assert len(list(area.path.glob("*.safetensors"))) >= 3  # at least one file per layer
    with torch.inference_mode():
        assert torch.equal(spilled(IDS).logits, kept(IDS).logits)
    save(kept, tmp_path / "kept")
    save(spilled, tmp_path / "spilled")
    names = sorted(p.name for p in (tmp_path / "kept").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "spilled").iterdir())
    for name in names:
        assert (tmp_path / "kept" / name).read_bytes() == (tmp_path / "spilled" / name).read_bytes()


def test_each_layer_is_spilled_before_the_next_one_is_calibrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimc.runner import LayerwiseRunner

    work = WorkDir.open(tmp_path / "work", {"run": "w8a8"}, resume=False)
    files: list[int] = []
    original = LayerwiseRunner.forward

    def counting(self, nodes, hooks=None, keep=False, *, advance=False):  # type: ignore[no-untyped-def]
        if hooks:  # a visit observing a layer: count the files written so far
            files.append(len(list((work.path / "spill").glob("*.safetensors"))))
        return original(self, nodes, hooks, keep, advance=advance)

    monkeypatch.setattr(LayerwiseRunner, "forward", counting)
    slimc.compile(tiny_llama(layers=3), "w8a8", calib=CALIB, progress=False, work_dir=work)
    assert files == sorted(files) and files[0] < files[-1]


def test_small_tensors_stay_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weight_spill, "MIN_SPILL_BYTES", 1 << 30)
    work = WorkDir.open(tmp_path / "work", {"run": "dyn"}, resume=False)
    out = slimc.compile(tiny_llama(), "w8a8-dynamic", progress=False, work_dir=work)
    assert out.slimc_program.context.spill.bytes_spilled == 0
    assert not list((work.path / "spill").glob("*.safetensors"))
