"""The streamed AscendV1 save writes what the one-dict `save_file` save wrote, with bounded memory."""

from __future__ import annotations

import errno
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import slimc
from slimc.errors import UserError
from slimc.export import ascend_v1, shards
from slimc.export.ascend_v1 import DESCRIPTION_NAME, WEIGHTS_NAME, load_ascend_v1
from slimc.export.ascend_v1_tensors import linear_tensors
from slimc.nn import QuantizedLinear
from tests.export.disk import fill_disk_after
from tests.models import tiny_gemma2, tiny_llama, tiny_opt

CALIB = [
    torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)
]
HEAD_TOO = "linear-quant{scheme=w8a16 ignore=nothing},fuse-quantized-linear"


def _bf16_llama() -> nn.Module:
    return tiny_llama().to(torch.bfloat16)


FAMILIES = {"llama": tiny_llama, "gemma2": tiny_gemma2, "opt": tiny_opt, "bf16": _bf16_llama}
CASES = [
    ("llama", "w8a8"),
    ("llama", "w8a8-dynamic"),
    ("llama", "w4a16{group-size=32}"),
    ("llama", "w4a8"),
    ("llama", HEAD_TOO),  # quantized head: the tied embedding is saved, the config unties it
    ("gemma2", "w8a8-dynamic"),
    ("gemma2", "w4a16{group-size=32}"),
    ("opt", "w8a8"),  # linear biases folded into quant_bias
    ("opt", "w4a16{group-size=32}"),
    ("bf16", "w8a8"),  # deq_scale kept as float32, not as int64 bits
]
_COMPILED: dict[tuple[str, str], nn.Module] = {}


def _compiled(family: str, scheme: str) -> nn.Module:
    if (family, scheme) not in _COMPILED:
        model = FAMILIES[family]()
        _COMPILED[family, scheme] = slimc.compile(model, scheme, calib=CALIB, progress=False)
    return _COMPILED[family, scheme]


def _reference_save(q: nn.Module, out: Path) -> None:
    """The save before streaming: every output tensor gathered in one dict, one `save_file`."""
    out.mkdir()
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, QuantizedLinear)}
    dtype = next(p.dtype for p in q.parameters() if p.is_floating_point())
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for key, t in q.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key.rpartition(".")[0] in quantized or ident in seen:
            continue
        seen.add(ident)
        tensors[key] = t.detach().cpu().contiguous()
    modes = dict.fromkeys(tensors, "FLOAT")
    for name, lin in quantized.items():
        mode, parts = linear_tensors(name, lin, dtype)
        for suffix, t in parts.items():
            tensors[f"{name}.{suffix}"] = t
            modes[f"{name}.{suffix}"] = mode
    sizes = {lin.scheme.weight.group_size for lin in quantized.values()} - {-1}
    description = {
        "model_quant_type": max(set(modes.values()), key=ascend_v1.MODE_PRIORITY.index),
        "version": "1.0.0",
        "group_size": sizes.pop() if sizes else 0,
        "metadata": {"producer": "slimc"},
        **dict(sorted(modes.items())),
    }
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    text = json.dumps(description, indent=2, ensure_ascii=False) + "\n"
    (out / DESCRIPTION_NAME).write_text(text, encoding="utf-8")
    q.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    head = q.get_output_embeddings()
    if config.get("tie_word_embeddings") and any(m is head for m in quantized.values()):
        config["tie_word_embeddings"] = False
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (out / "config.json").write_text(text, encoding="utf-8")
    q.generation_config.save_pretrained(out)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not iterable


@pytest.mark.parametrize(("family", "scheme"), CASES)
def test_streamed_save_equals_one_dict_save(tmp_path, family, scheme):
    q = _compiled(family, scheme)
    _reference_save(q, tmp_path / "ref")
    out = slimc.save(q, tmp_path / "stream", format="ascend-v1")
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))
    got, want = _tensors(out / WEIGHTS_NAME), _tensors(tmp_path / "ref" / WEIGHTS_NAME)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key
    for name in (DESCRIPTION_NAME, "config.json", "generation_config.json"):
        assert (out / name).read_text() == (tmp_path / "ref" / name).read_text(), name
    assert set(load_ascend_v1(out).tensors) == set(got)  # the reader takes the streamed file


def test_each_linear_is_made_when_written_and_dropped_after(tmp_path, monkeypatch):
    """No linear's packed weight outlives its turn; float tensors come from the model itself."""
    q = _compiled("llama", "w4a16{group-size=32}")
    made: list[tuple[str, weakref.ref]] = []
    alive_when_next_made: list[str] = []

    def tracked(name, lin, dtype):
        alive_when_next_made.extend(n for n, ref in made if ref() is not None)
        mode, parts = linear_tensors(name, lin, dtype)
        made.append((name, weakref.ref(parts["weight"])))
        return mode, parts

    pointers: dict[str, int] = {}
    real_write = shards._write_tensor

    def write(f, shard, name, tensor):
        pointers[name] = tensor.data_ptr()
        real_write(f, shard, name, tensor)

    monkeypatch.setattr(ascend_v1, "linear_tensors", tracked)
    monkeypatch.setattr(shards, "_write_tensor", write)
    out = slimc.save(q, tmp_path / "out", format="ascend-v1")
    quantized = [n for n, m in q.named_modules() if isinstance(m, QuantizedLinear)]
    assert [n for n, _ in made] == quantized and len(made) > 2
    assert alive_when_next_made == []
    floats = {k: v for k, v in load_ascend_v1(out).modes.items() if v == "FLOAT"}
    state = q.state_dict()
    assert floats and all(pointers[k] == state[k].data_ptr() for k in floats)


def test_full_disk_is_one_line_error_and_leaves_nothing(tmp_path, monkeypatch):
    q = _compiled("llama", "w8a8")
    calls = fill_disk_after(monkeypatch)
    with pytest.raises(UserError) as info:
        slimc.save(q, tmp_path / "out", format="ascend-v1")
    assert len(calls) > 2  # the disk filled up in the middle of the save
    message = str(info.value)
    assert "\n" not in message
    assert "no space left" in message and WEIGHTS_NAME in message
    assert os.listdir(tmp_path) == []


def test_full_disk_after_the_tensors_is_one_line_error(tmp_path, monkeypatch):
    q = _compiled("llama", "w8a8")
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == DESCRIPTION_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match=f"no space left .*{DESCRIPTION_NAME}") as info:
        slimc.save(q, tmp_path / "out", format="ascend-v1")
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_single_file_is_never_split(tmp_path):
    tensors = {f"t{i}": torch.full((4, 4), float(i)) for i in range(5)}
    units = [shards.ShardUnit(64, lambda n=n, t=t: [(n, t)], [n]) for n, t in tensors.items()]
    paths = shards.write_sharded_checkpoint(
        tmp_path, units, max_shard_bytes=64, single_file="weights.safetensors"
    )
    assert paths == [tmp_path / "weights.safetensors"]
    assert os.listdir(tmp_path) == ["weights.safetensors"]  # no index
    got = _tensors(tmp_path / "weights.safetensors")
    assert sorted(got) == sorted(tensors)
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
