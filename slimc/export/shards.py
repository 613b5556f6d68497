"""Write a safetensors checkpoint tensor by tensor, in size-bounded shards, with bounded memory."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from slimc.errors import UserError

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ShardUnit",
    "disk_full_is_user_error",
    "write_sharded_checkpoint",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
# a header entry: "name":{"dtype":"F8_E4M3","shape":[<= 8 dims],"data_offsets":[a,b]},
_ENTRY_OVERHEAD = 64 + 8 * 21 + 2 * 21
_ALIGN = 8


@dataclass
class ShardUnit:
    """Tensors written together: `tensors()` yields (name, tensor) once the unit's turn comes.

    `names` (exact names, or prefixes of up to `max_tensors` names each when the names are only
    known once the tensors are made) bound the shard header; `nbytes` is the expected size, used
    to cut shards.
    """

    nbytes: int
    tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]]
    names: list[str]
    max_tensors: int = 1

    def header_bound(self) -> int:
        per_name = self.max_tensors * _ENTRY_OVERHEAD
        return sum(self.max_tensors * (len(json.dumps(n)) + 32) + per_name for n in self.names)


@dataclass
class _Shard:
    path: Path
    units: list[ShardUnit]
    header_bytes: int = 0
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    offset: int = 0


def _plan(units: Iterable[ShardUnit], max_shard_bytes: int) -> list[list[ShardUnit]]:
    shards: list[list[ShardUnit]] = [[]]
    size = 0
    for unit in units:
        if shards[-1] and size + unit.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit.nbytes
    return shards


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _write_tensor(f: BinaryIO, shard: _Shard, name: str, tensor: torch.Tensor) -> None:
    if name in shard.entries:
        raise RuntimeError(f"tensor {name} written twice to {shard.path.name}")
    if tensor.dtype not in _DTYPES:
        raise UserError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
    data = _raw_bytes(tensor)
    write_shard_bytes(f, data)
    end = shard.offset + len(data)
    shard.entries[name] = {
        "dtype": _DTYPES[tensor.dtype],
        "shape": list(tensor.shape),
        "data_offsets": [shard.offset, end],
    }
    shard.offset = end


def write_shard_bytes(f: BinaryIO, data: memoryview | bytes) -> None:
    """Write `data` to an open shard file (one place to fail for a full disk)."""
    f.write(data)


def _fill_shard(f: BinaryIO, shard: _Shard) -> int:
    """Stream the shard's tensors into `f`; return the number of tensors.

    Tensors whose size is a multiple of 8 bytes go out at once (every offset stays 8-aligned);
    the rare others wait until the shard's end, largest element first, so that every tensor
    starts at a multiple of its element size (safetensors' own layout rule).
    """
    deferred: list[tuple[str, torch.Tensor]] = []
    for unit in shard.units:
        for name, tensor in unit.tensors():
            if (tensor.numel() * tensor.element_size()) % _ALIGN:
                deferred.append((name, tensor.detach()))  # held, not copied
            else:
                _write_tensor(f, shard, name, tensor)
    deferred.sort(key=lambda item: -item[1].element_size())
    for name, tensor in deferred:
        _write_tensor(f, shard, name, tensor)
    return len(shard.entries)


def _header(shard: _Shard) -> bytes:
    header = {"__metadata__": {"format": "pt"}, **shard.entries}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(text) > shard.header_bytes:
        raise RuntimeError(
            f"{shard.path.name}: header of {len(text)} bytes exceeds the {shard.header_bytes} "
            "reserved for it"
        )
    return text + b" " * (shard.header_bytes - len(text))


def _write_shard(shard: _Shard) -> None:
    bound = len('{"__metadata__":{"format":"pt"}}') + sum(u.header_bound() for u in shard.units)
    shard.header_bytes = -(-(bound + 8) // _ALIGN) * _ALIGN
    with open(shard.path, "wb") as f:
        f.seek(8 + shard.header_bytes)
        _fill_shard(f, shard)
        header = _header(shard)
        f.seek(0)
        write_shard_bytes(f, struct.pack("<Q", len(header)) + header)


def _shard_paths(out: Path, count: int) -> Iterator[Path]:
    if count == 1:
        yield out / SINGLE_NAME
        return
    for i in range(count):
        yield out / f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_sharded_checkpoint(
    out: Path,
    units: list[ShardUnit],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    index_metadata: dict[str, Any] | None = None,
    single_file: str | None = None,
) -> list[Path]:
    """Write `units` into `out` as safetensors shards; return the shard paths.

    Shards are cut between units once `max_shard_bytes` would be exceeded (a unit larger than
    that gets its own shard). One shard is named `model.safetensors`; several are named
    `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json` (weight map, total size
    and `index_metadata`) is written last, as `save_pretrained` does. Each tensor is released
    once written; the shard's header, reserved ahead of its data, is filled in at its end.
    With `single_file`, every unit goes into one file of that name (never split, no index).

    Raises:
        UserError: the disk filled up while writing (the message names the file).
    """
    planned = [list(units)] if single_file else _plan(units, max_shard_bytes)
    paths = [out / single_file] if single_file else _shard_paths(out, len(planned))
    shards = [_Shard(p, u) for p, u in zip(paths, planned, strict=True)]
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        with disk_full_is_user_error(shard.path):
            _write_shard(shard)
        log.debug("wrote %s: %d tensors", shard.path.name, len(shard.entries))
        for name, entry in shard.entries.items():
            weight_map[name] = shard.path.name
            total += entry["data_offsets"][1] - entry["data_offsets"][0]
    if len(shards) > 1:
        index = {
            "metadata": {**(index_metadata or {}), "total_size": total},
            "weight_map": weight_map,
        }
        with disk_full_is_user_error(out / INDEX_NAME):
            (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [s.path for s in shards]


@contextlib.contextmanager
def disk_full_is_user_error(path: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) while writing `path` into a one-line UserError."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"no space left on the device while writing {path} ({os.strerror(exc.errno)})"
            ) from exc
        raise
