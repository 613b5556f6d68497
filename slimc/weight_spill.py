"""Move the tensors passes write (quantized weights, scales) to memory-mapped files as layers finish."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import fx

from slimc.export.shards import ShardUnit, write_sharded_checkpoint
from slimc.program import Program, replace_attr

log = logging.getLogger(__name__)

MIN_SPILL_BYTES = 1 << 20
"""Tensors smaller than this stay in memory (scales, norms): their files would cost more."""


class SpillArea:
    """A directory of safetensors files holding tensors a program wrote. Each file is written
    once and read back memory-mapped: the tensors then live in the page cache, which the kernel
    reclaims under memory pressure (a cgroup cap), instead of in the process's own memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._count = 0
        self.bytes_spilled = 0
        self._spilled: set[int] = set()  # data_ptr of tensors already backed by a file

    def spill(self, program: Program, targets: Iterable[str]) -> int:
        """Move the written constants among `targets` of at least `MIN_SPILL_BYTES` to a new
        file and make the program read them from it (the values are unchanged); returns the
        bytes moved."""
        store = program.weights
        chosen: dict[str, torch.Tensor] = {}
        for target in dict.fromkeys(targets):
            if target not in store or not store.is_written(target):
                continue
            t = store.get(target)
            if (
                t.device.type != "cpu"
                or t.numel() * t.element_size() < MIN_SPILL_BYTES
                or t.data_ptr() in self._spilled
                or t.is_sparse
            ):
                continue
            chosen[target] = t
        if not chosen:
            return 0
        self.path.mkdir(parents=True, exist_ok=True)
        file = self.path / f"{self._count:05d}.safetensors"
        self._count += 1
        seen: set[int] = set()
        tensors: dict[str, torch.Tensor] = {}
        for name, t in chosen.items():  # safetensors refuses two names on one storage
            storage = t.untyped_storage().data_ptr()
            tensors[name] = t.detach().contiguous() if storage not in seen else t.detach().clone()
            seen.add(storage)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        unit = ShardUnit(nbytes, lambda: tensors.items(), list(tensors))
        write_sharded_checkpoint(self.path, [unit], single_file=file.name)  # tensor by tensor
        mapped = load_file(str(file))
        moved = 0
        for target, value in mapped.items():
            replace_attr(program.graph_module, target, value)
            self._spilled.add(value.data_ptr())
            moved += value.numel() * value.element_size()
        self.bytes_spilled += moved
        return moved


def constants_read_by(nodes: Iterable[fx.Node]) -> list[str]:
    """The constants (`get_attr` targets) the nodes read."""
    out: list[str] = []
    for node in nodes:
        out.extend(str(i.target) for i in node.all_input_nodes if i.op == "get_attr")
    return out


def spill_constants_of(program: Program, nodes: Iterable[fx.Node]) -> None:
    """Spill what `nodes` read, when the run has a spill area (`RunContext.spill`)."""
    area = program.context.spill
    if area is not None:
        area.spill(program, constants_read_by(nodes))


def spill_all(program: Program) -> None:
    """Spill every written constant, when the run has a spill area."""
    area = program.context.spill
    if area is not None:
        area.spill(program, program.weights.names())
