"""Exception types shared by the slimc library and its command-line tools."""

from __future__ import annotations

__all__ = ["PipelineError", "SlimcError", "UserError", "first_line"]


class SlimcError(Exception):
    """Base class of all errors raised on purpose by slimc."""


class UserError(SlimcError):
    """A problem with the user's input; CLIs print it as one line without a traceback."""


class PipelineError(UserError):
    """A pipeline that cannot run: unknown pass, bad option, or a pass on the wrong stage."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
