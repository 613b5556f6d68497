"""Atomic directory writes: build the output in a temporary sibling, then rename it into place."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from slimc.errors import UserError

__all__ = [
    "apply_umask",
    "atomic_directory",
    "check_target",
    "clean_stale",
    "current_umask",
    "looks_like_model_directory",
]

log = logging.getLogger(__name__)

_TMP_TAG = ".slimc-tmp-"
_OLD_TAG = ".slimc-old-"
_STALE_AFTER_S = 24 * 3600
"""A leftover whose writer cannot be identified is removed once it is this old."""

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.safetensors.index.json")
_SLIMC_OUTPUTS = ("model.pt2", "quant_model_description.json")  # pt2 / ascend-v1 outputs


def looks_like_model_directory(path: Path) -> bool:
    """Whether `path` looks like a model directory slimc or transformers wrote.

    That is a ``config.json`` next to weight files (safetensors, PyTorch .bin/.pt, GGUF), or a
    slimc pt2 (``model.pt2``) or ascend-v1 (``quant_model_description.json``) output.
    """
    if any((path / name).is_file() for name in _SLIMC_OUTPUTS):
        return True
    if not (path / "config.json").is_file():
        return False
    return any(p.is_file() for pattern in _WEIGHT_GLOBS for p in path.glob(pattern))


def _is_same_or_ancestor(candidate: Path, of: Path) -> bool:
    return candidate == of or candidate in of.parents


def _refuse_protected(target: Path, protected: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse the working directory, the home directory, their parents and the inputs."""
    real = target.resolve()
    home = Path.home().resolve()
    if _is_same_or_ancestor(real, home):
        what = "the home directory" if real == home else "a parent of the home directory"
        raise UserError(f"cannot save to {target}: it is {what}; give a new directory")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted
        cwd = None
    if cwd is not None and _is_same_or_ancestor(real, cwd):
        what = "the working directory" if real == cwd else "a parent of the working directory"
        raise UserError(f"cannot save to {target}: it is {what}; give a new directory")
    for item in protected:
        source = Path(item).expanduser().resolve()
        if _is_same_or_ancestor(real, source):
            raise UserError(
                f"cannot save to {target}: it holds the input model {source}; give a new directory"
            )


def _probe_writable(directory: Path, target: Path) -> None:
    """Create and remove a directory in `directory`: the only sure test (root, /proc, read-only)."""
    try:
        probe = tempfile.mkdtemp(prefix=".slimc-probe-", dir=directory)
    except OSError as exc:
        raise UserError(
            f"cannot save to {target}: cannot create files in {directory} ({exc.strerror or exc})"
        ) from exc
    os.rmdir(probe)


def check_target(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    protected: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Validate an output directory path before any work is done; return it made absolute.

    Rules: the target may be missing or an empty directory; a non-empty directory is only
    replaced with ``overwrite=True`` and only when it looks like a model directory
    (`looks_like_model_directory`); a file is never replaced. The working directory, the home
    directory, any parent of them and the `protected` paths (the input model) or their parents
    are never written. Nothing is created here: the nearest existing ancestor must be a
    directory where files can be created (missing parents are created by `atomic_directory`).

    Raises:
        UserError: any of the rules above is broken.
    """
    if not str(path).strip():
        raise UserError("cannot save to an empty path; give a directory name")
    target = Path(path).expanduser().absolute()
    _refuse_protected(target, protected)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise UserError(f"cannot save to {target}: it exists and is not a directory")
        if any(target.iterdir()):
            if not overwrite:
                raise UserError(
                    f"cannot save to {target}: the directory exists and is not empty "
                    "(pass overwrite=True / --overwrite to replace it)"
                )
            if not looks_like_model_directory(target):
                raise UserError(
                    f"cannot overwrite {target}: it does not look like a model directory "
                    "(config.json with weights, or a slimc pt2 / ascend-v1 output); "
                    "overwrite only replaces those"
                )
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot save to {target}: {ancestor} is not a directory")
    _probe_writable(ancestor, target)
    return target


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; return those created, deepest first."""
    created: list[Path] = []
    current = directory
    while not current.exists() and current != current.parent:
        created.append(current)
        current = current.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise UserError(f"cannot create {directory} ({exc.strerror or exc})") from exc
    return created


def _remove_empty(directories: list[Path]) -> None:
    for d in directories:  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def _writer_alive(name: str) -> bool | None:
    """Whether the process that made a leftover still runs (None: the name holds no pid)."""
    m = re.search(r"slimc-(?:tmp|old)-(\d+)-", name)
    if m is None:
        return None
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> int:
    """Remove leftovers of saves to `target` that were killed (SIGKILL, power loss).

    A leftover is a hidden ``.NAME.slimc-tmp-*`` / ``.NAME.slimc-old-*`` sibling whose writer
    process no longer runs (or, for names without a pid, that is over a day old).

    Returns:
        How many were removed.
    """
    removed = 0
    for tag in (_TMP_TAG, _OLD_TAG):
        for leftover in target.parent.glob(f".{glob_escape(target.name)}{tag}*"):
            if not leftover.is_dir() or leftover.is_symlink():
                continue
            alive = _writer_alive(leftover.name)
            if alive is None:
                alive = time.time() - leftover.stat().st_mtime < _STALE_AFTER_S
            if not alive:
                shutil.rmtree(leftover, ignore_errors=True)
                log.info("removed %s, left by an interrupted save", leftover)
                removed += 1
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain ``open`` / ``mkdir`` would.

    ``tempfile`` and some writers (safetensors via transformers) create 0600 / 0700 entries;
    a saved model should be readable as the user's umask allows.
    """
    mask = current_umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    os.chmod(root, dir_mode)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            p = os.path.join(base, d)
            if not os.path.islink(p):
                os.chmod(p, dir_mode)
        for f in files:
            p = os.path.join(base, f)
            if not os.path.islink(p):
                os.chmod(p, file_mode | (os.stat(p).st_mode & 0o111 & ~mask))


@contextmanager
def atomic_directory(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    protected: Sequence[str | os.PathLike[str]] = (),
) -> Iterator[Path]:
    """Context manager yielding a fresh temporary directory that becomes `path` on success.

    The temporary directory lives next to the target (same file system, so the final step is
    a rename). If the body raises (including KeyboardInterrupt), the temporary directory and
    the parent directories created for it are removed and nothing appears at `path`. With
    ``overwrite=True`` an existing model directory is first renamed aside and only deleted once
    the new one is in place, so a failure never leaves the target half-written. Leftovers of
    earlier saves to the same path that were killed are removed first (`clean_stale`), and the
    result gets the modes the umask gives (`apply_umask`).

    Args:
        path: the output directory.
        overwrite: replace an existing model directory (see `check_target`).
        protected: paths that must not be written or replaced (the input model).

    Yields:
        The temporary directory to write into.

    Raises:
        UserError: see `check_target`; also when the temporary directory cannot be created.
    """
    target = check_target(path, overwrite=overwrite, protected=protected)
    created = _make_parents(target.parent)
    clean_stale(target)
    try:
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{target.name}{_TMP_TAG}{os.getpid()}-", dir=target.parent)
        )
    except OSError as exc:
        _remove_empty(created)
        raise UserError(
            f"cannot save to {target}: cannot create files in {target.parent} "
            f"({exc.strerror or exc})"
        ) from exc
    try:
        yield tmp
        apply_umask(tmp)
        _move_into_place(tmp, target, overwrite=overwrite, protected=protected)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    log.info("wrote %s", target)


def _move_into_place(
    tmp: Path, target: Path, *, overwrite: bool, protected: Sequence[str | os.PathLike[str]]
) -> None:
    """Rename `tmp` to `target`, replacing an existing directory when allowed."""
    # The target may have appeared while we were writing: check again.
    check_target(target, overwrite=overwrite, protected=protected)
    old: Path | None = None
    if target.exists():
        if any(target.iterdir()):
            old = Path(
                tempfile.mkdtemp(
                    prefix=f".{target.name}{_OLD_TAG}{os.getpid()}-", dir=target.parent
                )
            )
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
