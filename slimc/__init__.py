"""slimc: a quantization compiler for PyTorch models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from slimc._checkout import move_checkout_root_last

move_checkout_root_last()

__version__ = "0.1.0"

__all__ = [
    "Pass",
    "PassManager",
    "PassResult",
    "Preserved",
    "Program",
    "Stage",
    "backend",
    "capture",
    "compile",
    "load",
    "option",
    "save",
]

_LAZY = {
    "Pass": "slimc.pass_base",
    "PassResult": "slimc.pass_base",
    "Preserved": "slimc.pass_base",
    "option": "slimc.pass_base",
    "PassManager": "slimc.pass_manager",
    "Program": "slimc.program",
    "Stage": "slimc.stage",
    "backend": "slimc.backend",
    "capture": "slimc.capture",
    "compile": "slimc.compiler",
    "save": "slimc.export",
    "load": "slimc.export",
}

if TYPE_CHECKING:
    from slimc import backend
    from slimc.capture import capture
    from slimc.compiler import compile_model as compile  # noqa: A004
    from slimc.export import load, save
    from slimc.pass_base import Pass, PassResult, Preserved, option
    from slimc.pass_manager import PassManager
    from slimc.program import Program
    from slimc.stage import Stage


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slimc' has no attribute {name!r}")
    mod = importlib.import_module(module)
    if module == f"slimc.{name}":  # a submodule (`slimc.backend`)
        return mod
    return getattr(mod, "compile_model" if name == "compile" else name)
