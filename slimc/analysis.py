"""Analyses and the AnalysisManager that computes, caches and invalidates them."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from slimc.pass_base import Preserved
    from slimc.program import Program

log = logging.getLogger(__name__)


class Analysis(Protocol):
    """A fact computed from a program. `compute` must not change the program."""

    name: str

    @classmethod
    def compute(cls, program: Program, am: AnalysisManager) -> Analysis: ...


A = TypeVar("A")


class AnalysisManager:
    """Computes analyses on demand, caches them, and drops those a pass did not preserve."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._cache: dict[type, object] = {}

    def get(self, cls: type[A]) -> A:
        """The analysis for the current program, computed once and cached."""
        if cls not in self._cache:
            log.debug("computing analysis %s", cls.__name__)
            self._cache[cls] = cls.compute(self.program, self)  # type: ignore[attr-defined]
        return self._cache[cls]  # type: ignore[return-value]

    def cached(self, cls: type[A]) -> A | None:
        """The cached analysis, or None; never computes."""
        return self._cache.get(cls)  # type: ignore[return-value]

    def set(self, cls: type[A], value: A) -> None:
        """Store an analysis a pass updated itself (so it stays valid without recomputing)."""
        self._cache[cls] = value

    def invalidate(self, preserved: Preserved) -> None:
        for cls in list(self._cache):
            if not preserved.keeps(cls):
                del self._cache[cls]

    def cached_names(self) -> list[str]:
        return sorted(getattr(c, "name", c.__name__) for c in self._cache)
