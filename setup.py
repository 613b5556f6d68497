"""Build script: slimc is assembled from four folders, and every subpackage under them is found.

setuptools' `packages.find` in pyproject.toml cannot follow a package-dir mapping into
subpackages (kernels/cpu is `slimc.kernels.cpu`), so the packages are found here instead of
being listed by hand; everything else is configured in pyproject.toml.
"""

from __future__ import annotations

from setuptools import find_packages, setup

PACKAGE_DIRS = {
    "slimc": "slimc",
    "slimc.passes": "passes",
    "slimc.kernels": "kernels",
    "slimc.tools": "tools",
}
"""Package -> the folder that holds it; a subpackage is a folder with an `__init__.py`."""


def packages() -> list[str]:
    """Every package under the mapped folders, named inside `slimc`."""
    found: list[str] = []
    for package, folder in PACKAGE_DIRS.items():
        found += [package, *(f"{package}.{sub}" for sub in find_packages(folder))]
    return sorted(found)


setup(packages=packages(), package_dir=PACKAGE_DIRS)
