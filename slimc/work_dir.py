"""A run's work directory: what each layer-wise pass finished, so a killed run resumes where it stopped."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from slimc import distributed
from slimc.errors import UserError
from slimc.export.shards import ShardUnit, write_sharded_checkpoint

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPILL = "spill"
"""The folder of `slimc.weight_spill.SpillArea`'s files (not resume records)."""
FORMAT = 1


class LayerJournal:
    """The finished layers of one pass: one safetensors file per layer, written atomically
    (a temporary file, fsynced, renamed), so a file that exists is whole."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        path.mkdir(parents=True, exist_ok=True)

    def _file(self, label: str) -> Path:
        return self.path / f"{label}.safetensors"

    def finished(self, label: str) -> dict[str, torch.Tensor] | None:
        """The tensors recorded for layer `label`, or None when it did not finish."""
        file = self._file(label)
        if not file.exists():
            return None
        try:
            return load_file(str(file))
        except Exception as exc:  # noqa: BLE001 - a damaged record is a bad work directory
            raise UserError(f"work directory: cannot read {file}: {exc}") from exc

    def record(self, label: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write layer `label`'s tensors; once this returns, the layer counts as finished."""
        file = self._file(label)
        tmp = file.with_name(file.name + ".tmp")
        parts = {k: v.contiguous() for k, v in tensors.items()}
        nbytes = sum(t.numel() * t.element_size() for t in parts.values())
        unit = ShardUnit(nbytes, lambda: parts.items(), list(parts))
        write_sharded_checkpoint(self.path, [unit], single_file=tmp.name)  # tensor by tensor
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)

    def count_finished(self, labels: Iterable[str]) -> int:
        """How many of `labels`, in order, are finished before the first unfinished one."""
        done = 0
        for label in labels:
            if not self._file(label).exists():
                break
            done += 1
        return done


class WorkDir:
    """The work directory of one run, identified by a fingerprint of its inputs (model files,
    pipeline, calibration data): a run with other inputs cannot resume from it."""

    def __init__(
        self, path: Path, fingerprint: Mapping[str, str], created: Sequence[Path] = ()
    ) -> None:
        self.path = path
        self.fingerprint = dict(fingerprint)
        self.created = list(created)
        """Directories `open` made, the work directory's missing parents included."""
        self._sections: dict[str, int] = {}

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], fingerprint: Mapping[str, str], *, resume: bool
    ) -> WorkDir:
        """Create the work directory, or with `resume` reopen the one a killed run left.

        Raises:
            UserError: the directory exists without `resume`, or it belongs to another run.
        """
        path = Path(path).expanduser()
        manifest = path / MANIFEST
        if path.exists() and not resume:
            raise UserError(
                f"work directory {path} exists (an interrupted run?): add --resume to continue "
                "it, or remove it"
            )
        if path.exists():
            if not manifest.is_file():
                raise UserError(f"--resume: {path} is not a slimc work directory (no {MANIFEST})")
            try:
                stored = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserError(f"--resume: cannot read {manifest}: {exc}") from exc
            theirs = stored.get("fingerprint", {}) if isinstance(stored, dict) else {}
            differ = [
                k
                for k in sorted(set(theirs) | set(fingerprint))
                if theirs.get(k) != fingerprint.get(k)
            ]
            if differ or stored.get("format") != FORMAT:
                what = ", ".join(differ) or "format"
                raise UserError(
                    f"--resume: {path} is the work directory of another run (its {what} "
                    "differ): remove it, or give the command that made it"
                )
            log.info("resuming from work directory %s", path)
            return cls(path, fingerprint)
        created = [p for p in (path, *path.parents) if not p.exists()]
        try:
            path.mkdir(parents=True)
            tmp = manifest.with_name(MANIFEST + ".tmp")
            tmp.write_text(
                json.dumps({"format": FORMAT, "fingerprint": dict(fingerprint)}, indent=1)
            )
            os.replace(tmp, manifest)
        except OSError as exc:
            raise UserError(f"cannot create work directory {path}: {exc.strerror}") from exc
        return cls(path, fingerprint, created)

    @staticmethod
    def remove_stale(path: str | os.PathLike[str], key: str) -> None:
        """Remove the work directory at `path` if it is one whose fingerprint has `key` (a
        distributed rank's, which no run resumes); anything else there is left alone."""
        manifest = Path(path).expanduser() / MANIFEST
        try:
            stored = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(stored, dict) and key in stored.get("fingerprint", {}):
            log.info("removing %s, left by a distributed run that failed", manifest.parent)
            shutil.rmtree(manifest.parent)

    def journal(self, pass_name: str) -> LayerJournal:
        """The journal of the next pass named `pass_name` (a second one gets its own)."""
        n = self._sections.get(pass_name, 0) + 1
        self._sections[pass_name] = n
        name = pass_name if n == 1 else f"{pass_name}-{n}"
        return LayerJournal(self.path / name, name)

    def has_records(self) -> bool:
        """Whether a layer-wise pass recorded a finished layer (something `--resume` skips)."""
        return any(p.parent.name != SPILL for p in self.path.glob("*/*.safetensors"))

    def remove(self) -> None:
        """Delete the work directory, and the parents `open` created once they are empty."""
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self.created[1:]:
            try:
                parent.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def failure_keeps_records(work_dir: WorkDir | None) -> Iterator[None]:
    """On an error inside, keep `work_dir` when it records finished layers (and say how to
    resume), else remove it: a failure before any layer finished leaves nothing behind. A
    distributed run (`slimc.distributed`) does not resume: its work directories are removed."""
    try:
        yield
    except BaseException:
        if work_dir is not None:
            if work_dir.has_records() and not distributed.active():
                log.warning(
                    "kept the work directory %s: the same command with --resume continues "
                    "from the layers it records",
                    work_dir.path,
                )
            else:
                work_dir.remove()
        raise


def fingerprint_files(paths: Iterable[Path]) -> str:
    """A digest of files' names, sizes and modification times (cheap for large checkpoints)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def fingerprint_tensors(tensors: Iterable[torch.Tensor]) -> str:
    """A digest of tensors' dtypes, shapes and values."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
