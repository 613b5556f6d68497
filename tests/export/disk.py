"""A full disk for save tests: the shard writer's writes fail with ENOSPC after a few."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from slimc.export import shards


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, writes: int = 2) -> list[int]:
    """Make the shard writer's writes after the first `writes` fail as on a full disk; returns
    the list of attempted write sizes."""
    calls: list[int] = []

    def full(f: Any, data: Any) -> None:
        calls.append(len(data))
        if len(calls) > writes:  # a few tensors are on disk already
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        f.write(data)

    monkeypatch.setattr(shards, "write_shard_bytes", full)
    return calls
