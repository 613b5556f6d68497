"""Kernel tests: Triton kernels run in the CPU interpreter when there is no GPU; a `device` fixture."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must happen before any kernel module is imported: @triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """cuda when a GPU is present (real kernels), else cpu (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
