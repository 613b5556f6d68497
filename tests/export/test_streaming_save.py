"""The streamed compressed-tensors save writes what the model-copy `save_pretrained` path writes."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import slimc
from slimc.errors import UserError
from slimc.export import compressed_tensors as ct
from slimc.export import ct_stream, shards
from tests.export.disk import fill_disk_after
from tests.models import tiny_decoder, tiny_gemma2, tiny_llama, tiny_opt

CALIB = [
    torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)
]
X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(123))
MIXED = (
    "linear-quant{scheme=w4a16 group-size=32 only=*mlp*},"
    "linear-quant{scheme=w8a16 ignore=nothing},fuse-quantized-linear"
)
SCHEMES = [
    "w8a8-dynamic",
    "w8a8",
    "w4a16{group-size=32}",
    "w4a16{symmetric=true group-size=32}",
    "w8a16",
]


def _untied_llama():
    return tiny_decoder(
        "LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=False
    )


FAMILIES = {"llama": tiny_llama, "gemma2": tiny_gemma2, "opt": tiny_opt, "untied": _untied_llama}
CASES = (
    [("llama", s) for s in [*SCHEMES, MIXED]]
    + [("gemma2", s) for s in ["w8a8-dynamic", "w4a16{group-size=32}", MIXED]]
    + [("opt", s) for s in ["w8a8", "w4a16{symmetric=true group-size=32}"]]
    + [("untied", s) for s in ["w8a8-dynamic", "w4a16{group-size=32}"]]
)
_COMPILED: dict[tuple[str, str], torch.nn.Module] = {}


def _compiled(family: str, scheme: str) -> torch.nn.Module:
    if (family, scheme) not in _COMPILED:
        model = FAMILIES[family]()
        _COMPILED[family, scheme] = slimc.compile(model, scheme, calib=CALIB, progress=False)
    return _COMPILED[family, scheme]


def _save_copy_path(q, out: Path, monkeypatch) -> None:
    """The former save: every linear compressed into a model copy, then `save_pretrained`."""
    out.mkdir(exist_ok=True)
    with monkeypatch.context() as m:
        m.setattr(ct_stream, "streaming_blocker", lambda model: "reference")
        ct.save_compressed_tensors(q, out)


def _save_streamed(q, out: Path, monkeypatch, **kw) -> None:
    out.mkdir(exist_ok=True)  # the caller (slimc.save) passes an existing empty directory
    with monkeypatch.context() as m:  # the copy path must not be taken
        m.setattr(ct, "_save_from_model_copy", _fail)
        ct.save_compressed_tensors(q, out, **kw)


def _fail(*args, **kwargs):
    raise AssertionError("the model-copy save path was used")


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                assert key not in found
                found[key] = f.get_tensor(key)
    return found


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _assert_same_checkpoint(got: Path, want: Path) -> None:
    a, b = _tensors(got), _tensors(want)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    assert _json(got / "config.json") == _json(want / "config.json")
    gen = "generation_config.json"
    assert _json(got / gen) == _json(want / gen)


@pytest.mark.parametrize(("family", "scheme"), CASES)
def test_streamed_save_equals_copy_save(tmp_path, monkeypatch, family, scheme):
    q = _compiled(family, scheme)
    _save_copy_path(q, tmp_path / "copy", monkeypatch)
    _save_streamed(q, tmp_path / "stream", monkeypatch)
    assert sorted(os.listdir(tmp_path / "stream")) == sorted(os.listdir(tmp_path / "copy"))
    _assert_same_checkpoint(tmp_path / "stream", tmp_path / "copy")


def test_sharded_save_and_reload(tmp_path, monkeypatch):
    q = _compiled("llama", "w8a8-dynamic")
    _save_copy_path(q, tmp_path / "copy", monkeypatch)
    out = tmp_path / "sharded"
    _save_streamed(q, out, monkeypatch, max_shard_bytes=20_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) >= 3 and "model.safetensors" not in files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    _assert_same_checkpoint(out, tmp_path / "copy")
    index = _json(out / "model.safetensors.index.json")
    tensors = _tensors(out)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(
        files
    )
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    with torch.no_grad():
        got = slimc.load(out)(X).logits
        want = slimc.load(tmp_path / "copy")(X).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_total_parameters_match_save_pretrained(tmp_path, monkeypatch):
    """With shards, the index's metadata is what `save_pretrained` writes."""
    q = _compiled("llama", "w4a16{group-size=32}")
    copy_out = tmp_path / "copy"
    copy_out.mkdir()
    with monkeypatch.context() as m:
        real = ct._save_from_model_copy
        m.setattr(ct_stream, "streaming_blocker", lambda model: "reference")
        m.setattr(ct, "_save_from_model_copy", lambda *a: real(*a, max_shard_size=40_000))
        ct.save_compressed_tensors(q, copy_out)
    stream_out = tmp_path / "stream"
    _save_streamed(q, stream_out, monkeypatch, max_shard_bytes=40_000)
    want = _json(copy_out / "model.safetensors.index.json")
    got = _json(stream_out / "model.safetensors.index.json")
    assert got["metadata"] == want["metadata"]
    assert set(got["weight_map"]) == set(want["weight_map"])


def test_streamed_save_round_trip_logits(tmp_path):
    """Through `slimc.save` (atomic directory) and transformers' loader."""
    q = _compiled("llama", "w8a16")
    r = slimc.load(slimc.save(q, tmp_path / "out"))
    with torch.no_grad():
        got, want = r(X).logits, q(X).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_full_disk_is_one_line_error_and_leaves_nothing(tmp_path, monkeypatch):
    q = _compiled("llama", "w8a16")
    calls = fill_disk_after(monkeypatch)
    with pytest.raises(UserError) as info:
        slimc.save(q, tmp_path / "out")
    assert len(calls) > 2  # the disk filled up in the middle of the save
    message = str(info.value)
    assert "\n" not in message
    assert "no space left" in message and "model.safetensors" in message
    assert os.listdir(tmp_path) == []


def test_other_write_errors_propagate(tmp_path, monkeypatch):
    q = _compiled("llama", "w8a16")

    def broken(f, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(shards, "write_shard_bytes", broken)
    with pytest.raises(OSError, match="Input/output error"):
        slimc.save(q, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_renamed_checkpoint_falls_back_to_model_copy(tmp_path, monkeypatch, caplog):
    q = _compiled("llama", "w8a16")
    _save_streamed(q, tmp_path / "stream", monkeypatch)
    monkeypatch.setattr(q, "_checkpoint_conversion_mapping", {"^nothing": "nothing"}, raising=False)
    assert "checkpoint conversion mapping" in ct_stream.streaming_blocker(q)
    with caplog.at_level(logging.INFO, logger=ct.__name__):
        ct.save_compressed_tensors(q, tmp_path / "copy")
    assert "saving through a full model copy" in caplog.text
    _assert_same_checkpoint(tmp_path / "stream", tmp_path / "copy")


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt"])
def test_plain_families_stream(family):
    assert ct_stream.streaming_blocker(FAMILIES[family]()) is None


def test_shard_writer_aligns_odd_sized_tensors(tmp_path):
    """Tensors whose size is not a multiple of 8 bytes go last: every tensor starts aligned."""
    tensors = {
        "a.zero_point": torch.arange(3, dtype=torch.int8),
        "b.weight": torch.randn(4, 6),
        "c.scale": torch.randn(3, dtype=torch.bfloat16),
        "d.shape": torch.tensor([4, 6]),
        "e.weight": torch.randn(5, dtype=torch.float32),
    }
    units = [
        shards.ShardUnit(t.numel() * t.element_size(), lambda n=n, t=t: [(n, t)], [n])
        for n, t in tensors.items()
    ]
    (path,) = shards.write_sharded_checkpoint(tmp_path, units)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert (8 + header_len) % 8 == 0
    dtype_size = {"I8": 1, "BF16": 2, "F32": 4, "I64": 8}
    for name, entry in header.items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % dtype_size[entry["dtype"]] == 0, name
    got = _tensors(tmp_path)
    assert all(torch.equal(got[n], t) and got[n].dtype == t.dtype for n, t in tensors.items())
