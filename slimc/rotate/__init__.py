"""Rotations: Hadamard matrices and folding orthogonal rotations into a program's weights."""

from __future__ import annotations

from slimc.rotate.hadamard import hadamard, random_hadamard

__all__ = ["hadamard", "random_hadamard"]
