"""The import rules between slimc's layers, checked on every module by walking its AST.

Layers: the core (`slimc/`), the passes (`passes/`, installed as `slimc.passes`), the kernel
families (`kernels/`, `slimc.kernels`) and the tools (`tools/`, `slimc.tools`). Every import
counts: at module level or inside a function, `import x`, `from x import y` (relative ones
resolved) and `importlib.import_module("x")` with a literal name.

* no core module but `slimc/registry.py` imports `slimc.passes`, `slimc.kernels` or
  `slimc.tools`;
* no pass imports another module of `slimc.passes`;
* no pass imports `slimc.kernels`, lowering passes included: they load their kernel family
  through `slimc.registry.load_kernel_family`.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PACKAGE_DIRS = {
    "slimc": "slimc",
    "slimc.passes": "passes",
    "slimc.kernels": "kernels",
    "slimc.tools": "tools",
}
"""Package -> the folder that holds it (setup.py's `package_dir`)."""

UPPER_LAYERS = ("slimc.passes", "slimc.kernels", "slimc.tools")

# (importing module, imported module): imports that break a rule today, while the shared
# code they reach for (linear quantization's engine, the kernel families' loader) moves
# into core. Remove an entry when its import goes: the test fails while a listed import no
# longer exists, so this set only shrinks, to empty.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    """One import in a module: who imports what, and where."""

    module: str
    target: str
    path: str
    line: int
    type_only: bool = False
    """Inside an `if TYPE_CHECKING:` block: never runs."""


def module_name(path: Path, root: Path = ROOT) -> str:
    """The installed module name of a source file (`passes/gptq.py` -> `slimc.passes.gptq`)."""
    for package, folder in PACKAGE_DIRS.items():
        base = root / folder
        if path.is_relative_to(base):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    raise ValueError(path)


def source_files(root: Path = ROOT) -> list[Path]:
    """Every .py file of the four folders."""
    return sorted(
        path
        for folder in PACKAGE_DIRS.values()
        for path in (root / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    )


@functools.cache
def _tree_modules(root: Path) -> frozenset[str]:
    return frozenset(module_name(p, root) for p in source_files(root))


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a relative `from ... import` in `module` names."""
    if level == 0:
        return name or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([name] if name else [])])


def _literal_import(node: ast.Call) -> str | None:
    """The module name of `importlib.import_module("x")` / `import_module("x")`, if literal."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_of(path: Path, root: Path = ROOT) -> Iterator[Import]:
    """Every module `path` imports, at any depth of its AST.

    `from x import y` imports `x.y` when that is a module of the tree (`from slimc import
    passes`), else `x`.
    """
    tree_modules = _tree_modules(root)
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    rel = str(path.relative_to(root))
    tree = ast.parse(path.read_text(), filename=rel)
    type_only = {
        id(inner)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for inner in ast.walk(block)
    }
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            named = (f"{base}.{alias.name}" for alias in node.names)
            targets = sorted({name if name in tree_modules else base for name in named})
        elif isinstance(node, ast.Call):
            literal = _literal_import(node)
            targets = [literal] if literal else []
        for target in targets:
            yield Import(module, target, rel, node.lineno, id(node) in type_only)


def _within(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def violation(imp: Import) -> str | None:
    """Which layer rule `imp` breaks, or None."""
    module, target = imp.module, imp.target
    in_core = not any(_within(module, layer) for layer in UPPER_LAYERS)
    if in_core and module != "slimc.registry":
        for layer in UPPER_LAYERS:
            if _within(target, layer):
                return f"core module imports {layer}"
    if _within(module, "slimc.passes"):
        if _within(target, "slimc.passes") and target != module:
            return "a pass imports another module of slimc.passes"
        if _within(target, "slimc.kernels"):
            return "a pass imports slimc.kernels"
    return None


def layer_violations() -> dict[tuple[str, str], list[str]]:
    """(module, imported module) -> 'path:line: rule' for every import that breaks a rule."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in source_files():
        for imp in imports_of(path):
            rule = violation(imp)
            if rule is not None:
                where = f"{imp.path}:{imp.line}: {rule}"
                found.setdefault((imp.module, imp.target), []).append(where)
    return found


def core_import_cycles(root: Path = ROOT) -> list[list[str]]:
    """Cycles among the core's modules, counting imports that run (module level or inside a
    function; not `TYPE_CHECKING` blocks, nor the `slimc` package itself, which every module's
    import loads first)."""
    modules = _tree_modules(root)
    edges: dict[str, set[str]] = {}
    for path in source_files(root):
        for imp in imports_of(path, root):
            core = not any(
                _within(m, layer) for m in (imp.module, imp.target) for layer in UPPER_LAYERS
            )
            if core and not imp.type_only and imp.target in modules and imp.target != "slimc":
                edges.setdefault(imp.module, set()).add(imp.target)
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            cycles.append([*stack[stack.index(module) :], module])
            return
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            visit(target, [*stack, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
    return cycles


def test_core_has_no_import_cycles() -> None:
    cycles = core_import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_cycle_through_function_level_imports(tmp_path: Path) -> None:
    (tmp_path / "slimc").mkdir()
    (tmp_path / "slimc" / "__init__.py").write_text("")
    (tmp_path / "slimc" / "a.py").write_text("from slimc.b import x\n")
    (tmp_path / "slimc" / "b.py").write_text("def f():\n    from slimc.a import y\n")
    (tmp_path / "slimc" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from slimc.a import z\n"
    )
    assert core_import_cycles(tmp_path) == [["slimc.a", "slimc.b", "slimc.a"]]


def test_every_source_folder_is_walked() -> None:
    names = {module_name(p) for p in source_files()}
    assert {"slimc.registry", "slimc.passes.gptq", "slimc.kernels", "slimc.tools.cli"} <= names
    assert len(names) > 100


def test_layers_import_only_downward() -> None:
    found = layer_violations()
    new = {key: where for key, where in found.items() if key not in KNOWN_VIOLATIONS}
    assert not new, "imports across layers:\n" + "\n".join(
        line for where in new.values() for line in where
    )


def test_known_violations_still_exist() -> None:
    gone = KNOWN_VIOLATIONS - set(layer_violations())
    assert not gone, f"no longer imported, remove from KNOWN_VIOLATIONS: {sorted(gone)}"


@pytest.mark.parametrize(
    ("module", "source", "rule"),
    [
        ("slimc/x.py", "from slimc.passes.gptq import GPTQ", "core module imports slimc.passes"),
        (
            "slimc/x.py",
            "def f():\n    import slimc.kernels.cpu",
            "core module imports slimc.kernels",
        ),
        ("slimc/x.py", "from slimc import tools", "core module imports slimc.tools"),
        (
            "slimc/x.py",
            "import importlib\nimportlib.import_module('slimc.kernels')",
            "core module imports slimc.kernels",
        ),
        ("slimc/sub/x.py", "from .. import passes", "core module imports slimc.passes"),
        (
            "passes/a.py",
            "from slimc.passes.b import B",
            "a pass imports another module of slimc.passes",
        ),
        ("passes/a.py", "from .b import B", "a pass imports another module of slimc.passes"),
        (
            "passes/a.py",
            "import slimc.kernels.w8a8",
            "a pass imports slimc.kernels",
        ),
        ("passes/lower_x.py", "import slimc.kernels.w8a8", "a pass imports slimc.kernels"),
        (
            "passes/lower_x.py",
            "from slimc.kernels.cpu import onednn",
            "a pass imports slimc.kernels",
        ),
        (
            "passes/lower_x.py",
            "def plan():\n    import importlib\n    importlib.import_module('slimc.kernels.w8a8')",
            "a pass imports slimc.kernels",
        ),
        (
            "passes/lower_x.py",
            "from slimc.registry import load_kernel_family\nw8a8 = load_kernel_family('w8a8')",
            None,
        ),
        ("slimc/registry.py", "import slimc.passes", None),
        ("slimc/x.py", "from slimc.ir import builder", None),
        ("tools/x.py", "from slimc.passes.gptq import GPTQ", None),
    ],
)
def test_checker_sees_each_kind_of_import(
    tmp_path: Path, module: str, source: str, rule: str | None
) -> None:
    for package in ("slimc", "passes", "kernels", "tools", "kernels/w8a8", "slimc/sub"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "passes" / "b.py").write_text("")
    path = tmp_path / module
    path.write_text(source + "\n")
    rules = {violation(imp) for imp in imports_of(path, tmp_path)} - {None}
    assert rules == ({rule} if rule else set())
