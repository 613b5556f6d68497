"""errors.first_line: the one formatter of an exception as one line."""

from __future__ import annotations

import pytest

from slimc.errors import first_line


@pytest.mark.parametrize(
    ("exc", "plain", "typed"),
    [
        (ValueError("bad value\n  details"), "bad value", "ValueError: bad value"),
        (RuntimeError("\n  indented first line  \nmore"), "indented first line", "RuntimeError: indented first line"),
        (ValueError(""), "ValueError", "ValueError"),
        (KeyError("x"), "'x'", "KeyError: 'x'"),
    ],
)
def test_first_line(exc: BaseException, plain: str, typed: str) -> None:
    assert first_line(exc) == plain
    assert first_line(exc, with_type=True) == typed
