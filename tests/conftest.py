"""Test setup: FileCheck IR tests (`tests/filecheck/**/*.py` RUN lines) and the `slow` marker."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import slimc  # noqa: F401  (first: a checkout root on sys.path must not shadow PyPI's kernels)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `from tests.models import ...` in tests and FileCheck cases;
    sys.path.append(str(ROOT))  # last: the root's kernels/ must not shadow PyPI's `kernels`

FILECHECK_DIR = Path(__file__).resolve().parent / "filecheck"
RUN_PREFIX = "# RUN:"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n N`: the workers share the cores
        # one intra-op thread each, in this process and the subprocesses tests start: two
        # OpenMP pools on the same cores spin against each other (5-15x slower)
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    # torch's own deepcopy of pytree specs (copying captured programs) warns; not ours to fix
    config.addinivalue_line(
        "filterwarnings", "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
    )


# -- the slow marker ------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="run tests marked slow (also: SLIMC_SLOW=1)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("SLIMC_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or SLIMC_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# -- in-process slimc-opt ------------------------------------------------------------
@dataclass
class OptResult:
    """Exit code and captured output of one in-process `slimc-opt` run."""

    rc: int
    out: str
    err: str


def run_opt(*args: str) -> OptResult:
    """Run `slimc-opt ARGS` in this process, capturing stdout and stderr."""
    from slimc.tools import opt

    _memoize_capture()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = opt.main(list(args))
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code if isinstance(exc.code, int) else 1
    return OptResult(rc, out.getvalue(), err.getvalue())


@pytest.fixture
def slimc_opt() -> Any:
    """`slimc_opt(*args) -> OptResult`: run slimc-opt in-process with captured output."""
    return run_opt


def _fingerprint(model: Any, example_inputs: Any, canonicalize: bool) -> str:
    import torch

    h = hashlib.sha256(f"{type(model).__qualname__}|{canonicalize}".encode())
    tensors = list(model.state_dict().items()) + [
        (f"input{i}", t) for i, t in enumerate(example_inputs or ()) if isinstance(t, torch.Tensor)
    ]
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_REAL_CAPTURE: list[Any] = []


def _memoize_capture() -> None:
    """Capture each distinct model once per session (slimc-opt input loading); every run gets its own deep copy.

    Installed on the first in-process run (custom FileCheck items take no fixtures) and
    removed in `pytest_unconfigure`.
    """
    from slimc.tools import opt_inputs as opt

    if _REAL_CAPTURE:
        return
    real = opt.capture_model
    _REAL_CAPTURE.append(real)
    cache: dict[str, Any] = {}

    def capture_model(model: Any, example_inputs: Any, canonicalize: bool = True) -> Any:
        key = _fingerprint(model, example_inputs, canonicalize)
        if key not in cache:
            cache[key] = real(model, example_inputs, canonicalize=canonicalize)
        return copy.deepcopy(cache[key])

    opt.capture_model = capture_model


def pytest_unconfigure(config: pytest.Config) -> None:
    if _REAL_CAPTURE:
        from slimc.tools import opt_inputs as opt

        opt.capture_model = _REAL_CAPTURE.pop()


# -- FileCheck collection ------------------------------------------------------------
@dataclass(frozen=True)
class RunLine:
    """`[not] slimc-opt %s ARGS [2>&1] | filecheck %s [FILECHECK ARGS]`, parsed."""

    opt_args: tuple[str, ...]
    filecheck_args: tuple[str, ...]
    expect_failure: bool
    merge_stderr: bool

    @classmethod
    def parse(cls, text: str, path: Path) -> RunLine:
        tokens = shlex.split(text)
        bar = tokens.index("|") if tokens.count("|") == 1 else 0
        opt, fc = tokens[:bar], tokens[bar + 1 :]
        expect_failure = bool(opt) and opt[0] == "not"
        opt = opt[1:] if expect_failure else opt
        merge = "2>&1" in opt
        opt = [a for a in opt if a != "2>&1"]
        if not opt or opt[0] != "slimc-opt" or not fc or fc[0] != "filecheck":
            raise ValueError(
                f"unsupported RUN line {text!r}; expected "
                "'[not] slimc-opt %s ARGS [2>&1] | filecheck %s [ARGS]'"
            )
        sub = str(path)
        return cls(
            tuple(a.replace("%s", sub) for a in opt[1:]),
            tuple(a.replace("%s", sub) for a in fc[1:]),
            expect_failure,
            merge,
        )


def run_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of each RUN line; a trailing backslash continues a line."""
    found: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped.startswith(RUN_PREFIX):
            continue
        body = stripped[len(RUN_PREFIX) :].strip()
        start, text = pending if pending else (lineno, "")
        text = f"{text} {body.rstrip(chr(92)).strip()}".strip()
        pending = (start, text) if body.endswith("\\") else None
        if pending is None:
            found.append((start, text))
    return found


class FileCheckFailure(Exception):
    """A RUN line whose output did not match its CHECK lines (or whose slimc-opt run failed)."""


def filecheck(text: str, argv: list[str]) -> tuple[int, str]:
    """Run the `filecheck` package on `text` (as stdin) with `filecheck ARGV`; (rc, messages).

    Note: filecheck 1.0.6 searches a CHECK-NOT up to the *end* of the next match (LLVM stops at
    its start), so `CHECK-NOT: X` must not be followed by a CHECK whose match contains X.
    """
    from filecheck.matcher import Matcher
    from filecheck.options import parse_argv_options

    err = io.StringIO()
    saved_stdin = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            opts = parse_argv_options(["filecheck", *argv])
            rc = Matcher.from_opts(opts).run()
    finally:
        sys.stdin = saved_stdin
    return rc, err.getvalue()


class FileCheckItem(pytest.Item):
    """One RUN line of a FileCheck file."""

    def __init__(self, *, lineno: int, command: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lineno = lineno
        self.command = command

    def runtest(self) -> None:
        run = RunLine.parse(self.command, self.path)
        res = run_opt(*run.opt_args)
        output = res.out + (res.err if run.merge_stderr else "")
        if run.expect_failure != (res.rc != 0):
            wanted = "failure" if run.expect_failure else 0
            raise FileCheckFailure(
                f"slimc-opt exited with {res.rc} (expected {wanted})"
                f"\n--- stderr ---\n{res.err[-4000:]}"
            )
        rc, message = filecheck(output, list(run.filecheck_args))
        if rc != 0:
            raise FileCheckFailure(f"{message}\n--- slimc-opt stderr ---\n{res.err[-2000:]}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, FileCheckFailure):
            return f"{self.path}:{self.lineno}: RUN: {self.command}\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.lineno - 1, f"{self.name}: {self.command}"


class FileCheckFile(pytest.File):
    """A FileCheck test file: one item per RUN line."""

    def collect(self) -> Iterator[FileCheckItem]:
        for lineno, command in run_lines(self.path):
            yield FileCheckItem.from_parent(
                self, name=f"RUN@{lineno}", lineno=lineno, command=command
            )


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    if file_path.suffix != ".py" or FILECHECK_DIR not in file_path.parents:
        return None
    if RUN_PREFIX not in file_path.read_text():
        return None
    return FileCheckFile.from_parent(parent, path=file_path)
