"""pytest's warning filter: a warning raised from slimc's own modules fails the test run."""

from __future__ import annotations

import warnings

import pytest


def _warn_from(module: str, category: type[Warning]) -> None:
    """Raise a warning attributed to `module` (as if that module's code called warnings.warn)."""
    exec(
        "warnings.warn('deprecated here', category)",
        {"__name__": module, "warnings": warnings, "category": category},
    )


@pytest.mark.parametrize(
    "module", ["slimc", "slimc.capture", "slimc.passes.gptq", "slimc.tools.cli"]
)
def test_a_warning_from_slimc_is_an_error(module: str) -> None:
    with pytest.raises(DeprecationWarning, match="deprecated here"):
        _warn_from(module, DeprecationWarning)


@pytest.mark.parametrize("module", ["torch.export", "transformers.modeling_utils", "slimcx"])
def test_a_warning_from_a_dependency_stays_a_warning(module: str) -> None:
    with pytest.warns(DeprecationWarning, match="deprecated here"):
        _warn_from(module, DeprecationWarning)
