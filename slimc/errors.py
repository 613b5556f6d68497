"""Exception types shared by the slimc library and its command-line tools."""

from __future__ import annotations

__all__ = ["PipelineError", "SlimcError", "UserError", "first_line"]


class SlimcError(Exception):
    """Base class of all errors raised on purpose by slimc."""


class UserError(SlimcError):
    """A problem with the user's input; CLIs print it as one line without a traceback."""


class PipelineError(UserError):
    """A pipeline that cannot run: unknown pass, bad option, or a pass on the wrong stage."""


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message (its type name when the message is empty).

    With `with_type`, the line is prefixed by the type name: `ValueError: bad value`.
    """
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if with_type else line
