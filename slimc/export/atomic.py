"""Atomic directory writes: build the output in a temporary sibling, then rename it into place."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimc.errors import UserError

__all__ = ["atomic_directory", "check_target"]

log = logging.getLogger(__name__)

_TMP_TAG = ".slimc-tmp-"
_OLD_TAG = ".slimc-old-"


def check_target(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Validate an output directory path before any work is done; return it made absolute.

    Rules: the target may be missing or an empty directory; a non-empty directory is only
    replaced with ``overwrite=True``; a file is never replaced. Missing parent directories are
    created (like ``save_pretrained``); the parent must be a writable directory.

    Raises:
        UserError: the target is a file, a non-empty directory without ``overwrite``, or its
            parent cannot be created or written.
    """
    target = Path(path).expanduser().absolute()
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise UserError(f"cannot save to {target}: it exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise UserError(
                f"cannot save to {target}: the directory exists and is not empty "
                "(pass overwrite=True / --overwrite to replace it)"
            )
    parent = target.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot save to {target}: {ancestor} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot save to {target}: cannot create {parent} ({exc.strerror or exc})"
        ) from exc
    if not parent.is_dir():
        raise UserError(f"cannot save to {target}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot save to {target}: the directory {parent} is not writable")
    return target


@contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Context manager yielding a fresh temporary directory that becomes `path` on success.

    The temporary directory lives next to the target (same file system, so the final step is
    a rename). If the body raises (including KeyboardInterrupt), the temporary directory is
    removed and nothing appears at `path`. With ``overwrite=True`` an existing directory is
    first renamed aside and only deleted once the new one is in place, so a failure never
    leaves the target half-written.

    Args:
        path: the output directory.
        overwrite: replace an existing non-empty directory (see `check_target`).

    Yields:
        The temporary directory to write into.

    Raises:
        UserError: see `check_target`; also when the temporary directory cannot be created.
    """
    target = check_target(path, overwrite=overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_TAG}", dir=target.parent))
    except OSError as exc:
        raise UserError(
            f"cannot save to {target}: cannot create files in {target.parent} "
            f"({exc.strerror or exc})"
        ) from exc
    try:
        yield tmp
        _move_into_place(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", target)


def _move_into_place(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename `tmp` to `target`, replacing an existing directory when allowed."""
    # The target may have appeared while we were writing: check again.
    check_target(target, overwrite=overwrite)
    old: Path | None = None
    if target.exists():
        if any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}{_OLD_TAG}", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
        else:
            os.rmdir(target)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
