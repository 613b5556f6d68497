"""Keep a source checkout's `kernels/` folder from shadowing PyPI's `kernels` package."""

from __future__ import annotations

import os
import sys
from pathlib import Path

CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
"""The folder holding `slimc/`: in a source checkout also `kernels/` (installed as
`slimc.kernels`)."""


def _is_checkout_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == CHECKOUT_ROOT
    except OSError:
        return False


def move_checkout_root_last() -> None:
    """Move sys.path entries naming the checkout root behind site-packages.

    `python -m ...` / `python -c ...` run in a checkout put its root first on sys.path, where
    `kernels/` (our kernel families, `slimc.kernels` once installed) would answer
    `import kernels` instead of the `kernels` distribution transformers requires. Nothing else
    changes: modules in the root stay importable, after the installed ones.
    """
    if "kernels" in sys.modules or not (CHECKOUT_ROOT / "kernels" / "__init__.py").is_file():
        return
    roots = [entry for entry in sys.path if _is_checkout_root(entry)]
    if roots:
        sys.path[:] = [entry for entry in sys.path if entry not in roots] + roots
