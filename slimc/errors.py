"""Exception types shared by the slimc library and its command-line tools."""

from __future__ import annotations

__all__ = ["PipelineError", "SlimcError", "UserError"]


class SlimcError(Exception):
    """Base class of all errors raised on purpose by slimc."""


class UserError(SlimcError):
    """A problem with the user's input; CLIs print it as one line without a traceback."""


class PipelineError(UserError):
    """A pipeline that cannot run: unknown pass, bad option, or a pass on the wrong stage."""
