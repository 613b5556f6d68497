"""The registry: passes found by convention in slimc.passes and in plugin packages, CLI roles."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from slimc import registry
from slimc.capture import capture
from slimc.pass_base import Pass
from slimc.pass_manager import PassManager
from slimc.tools import cli, opt
from tests.models import tiny_mlp

PLUGIN = "slimc_plugin_demo"

TAG_LINEARS = '''\
"""A plugin pass: tags linears (exact)."""

from __future__ import annotations

from dataclasses import dataclass

from slimc.pass_base import Pass, PassResult, Preserved, option
from slimc.stage import Stage


@dataclass(frozen=True, kw_only=True)
class TagLinears(Pass):
    """Count linears under a label (exact; a plugin for the registry test)."""

    name = "tag-linears"
    cli_role = "anti-outlier"
    accepts = frozenset(Stage)

    label: str = option("linears", "Name of the statistic.")
    bits: int = option(8, "Weight bits the tagging pretends to search against.")

    @classmethod
    def for_scheme(cls, target):
        return {"bits": (str(target.scheme.weight.bits),)}

    def run(self, program, am):
        n = sum(1 for node in program.graph.nodes if node.op == "call_function")
        self.stat(program, self.label, n)
        return PassResult(changed=False, preserved=Preserved.everything())


class _NotAPass:
    name = "not-a-pass"
'''

REEXPORT = '''\
"""Imports a pass from a sibling module: it is registered once, where it is defined."""

from slimc_plugin_demo.tag_linears import TagLinears  # noqa: F401
'''

PRIVATE = '''\
"""A private helper module: never searched for passes."""

from dataclasses import dataclass

from slimc.pass_base import Pass


@dataclass(frozen=True, kw_only=True)
class Hidden(Pass):
    """Hidden (exact)."""

    name = "hidden-helper"

    def run(self, program, am):
        raise AssertionError("never registered")
'''


@pytest.fixture(autouse=True)
def _forget_plugin_modules() -> Iterator[None]:
    """Each test imports its own copy of the plugin package."""

    def forget() -> None:
        for name in [m for m in sys.modules if m == PLUGIN or m.startswith(PLUGIN + ".")]:
            del sys.modules[name]

    forget()
    yield
    forget()


def _write_plugin(root: Path, modules: dict[str, str]) -> None:
    package = root / PLUGIN
    package.mkdir()
    (package / "__init__.py").write_text('"""A plugin package of slimc passes."""\n')
    for module, text in modules.items():
        (package / f"{module}.py").write_text(text)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A plugin package on sys.path, announced by a `slimc.passes` entry point naming it."""
    _write_plugin(
        tmp_path, {"tag_linears": TAG_LINEARS, "reexport": REEXPORT, "_private": PRIVATE}
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def entry_points(group: str) -> list[EntryPoint]:
        assert group == registry.ENTRY_POINT_GROUP
        return [EntryPoint("demo", PLUGIN, group)]

    monkeypatch.setattr(registry, "entry_points", entry_points)
    return PLUGIN


def test_in_tree_passes_are_every_named_pass_class_of_the_package() -> None:
    found = dict(registry.PASSES)
    assert found["linear-quant"] == "slimc.passes.linear_quant:LinearQuant"
    assert found["adapt-rotation"] == "slimc.passes.adapt_rotation:AdaptRotation"
    assert list(found) == sorted(found)
    for name, ref in found.items():
        module, _, attr = ref.partition(":")
        assert module.startswith("slimc.passes."), ref
        cls = registry.get_pass(name)
        assert (cls.__module__, cls.__qualname__) == (module, attr)
    # base classes without a name of their own (SmoothingPass, LoweringPass) are not passes
    assert not any(ref.endswith((":SmoothingPass", ":LoweringPass")) for ref in found.values())


def test_plugin_package_passes_are_found_by_convention(plugin: str) -> None:
    assert registry.discover_passes(plugin) == {
        "tag-linears": f"{plugin}.tag_linears:TagLinears"
    }
    names = registry.all_pass_names()
    assert "tag-linears" in names and "hidden-helper" not in names and "not-a-pass" not in names
    assert names == sorted(names)


def test_plugin_pass_is_listed_documented_and_parsed(plugin: str, capsys) -> None:
    assert opt.main(["--list-passes"]) == 0
    text = capsys.readouterr().out
    assert "  tag-linears - Count linears under a label (exact; a plugin" in text
    assert "    label: str = linears" in text

    assert opt.main(["--list-passes", "--format=md"]) == 0
    md = capsys.readouterr().out
    assert "| [`tag-linears`](#tag-linears) | Count linears under a label" in md
    assert "## `tag-linears`" in md and "| `bits` | `int` | `8` |" in md

    pm = PassManager.parse("tag-linears{label=ops}")
    (step,) = pm.steps
    assert type(step).__module__ == f"{plugin}.tag_linears" and step.label == "ops"
    model = tiny_mlp()
    program = capture(model, model.example_inputs())
    pm.run(program)
    assert program.statistics["tag-linears"]["ops"] > 0


def test_plugin_pass_with_a_cli_role_is_a_choice_of_slimc_quant(plugin: str) -> None:
    assert "tag-linears" in registry.passes_with_role("anti-outlier")
    args = cli.make_parser().parse_args(
        ["quant", "--quant-type", "w4a16", "--anti-outlier", "tag-linears", "--eval", "1"]
    )
    steps = PassManager.parse(cli.build_pipeline(args)).steps
    assert [s.name for s in steps] == ["tag-linears", "linear-quant", "fuse-quantized-linear"]
    assert steps[0].bits == 4  # set up for the scheme by the pass itself


def test_plugin_package_clashing_with_a_builtin_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_plugin(tmp_path, {"clash": TAG_LINEARS.replace('"tag-linears"', '"awq"')})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        registry, "entry_points", lambda group: [EntryPoint("demo", PLUGIN, group)]
    )
    with pytest.raises(RuntimeError, match="plugin pass 'awq' .* clashes with a built-in name"):
        registry.all_pass_names()


def test_two_classes_of_one_name_are_refused(tmp_path: Path, monkeypatch) -> None:
    twice = TAG_LINEARS.replace("class TagLinears", "class TagLinearsToo")
    _write_plugin(tmp_path, {"a": TAG_LINEARS, "b": twice})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="pass 'tag-linears' is declared twice"):
        registry.discover_passes(PLUGIN)


def test_cli_role_choices_come_from_the_passes() -> None:
    roles = {
        role: list(registry.passes_with_role(role))
        for role in ("anti-outlier", "rotation", "weight-method")
    }
    assert roles == {
        "anti-outlier": ["awq", "flex-awq-ssz", "flex-smooth-quant", "iter-smooth", "smooth-quant"],
        "rotation": ["adapt-rotation", "quarot"],
        "weight-method": ["autoround", "gptq", "rtn", "ssz"],
    }
    assert registry.passes_with_role("weight-method")["rtn"].name == "linear-quant"
    assert tuple(roles["anti-outlier"]) == registry.ANTI_OUTLIER
    quant = cli.make_parser()._subparsers._group_actions[0].choices["quant"]
    choices = {a.dest: a.choices for a in quant._actions if a.dest in ("anti_outlier", "rotation")}
    assert choices == {"anti_outlier": tuple(roles["anti-outlier"]), "rotation": tuple(roles["rotation"])}


def test_passes_without_a_role_configure_nothing_for_a_scheme() -> None:
    from slimc.quant.scheme import QuantTarget

    for name in registry.all_pass_names():
        cls: type[Pass] = registry.get_pass(name)
        if cls.cli_role is None:
            assert cls.for_scheme(QuantTarget("w4a16", 32, True)) == {}, name


def test_pass_reference_says_where_pipeline_options_go() -> None:
    from slimc.tools.pass_reference import list_passes

    expanded = registry.PIPELINES["w4a16-awq"].expand({"group-size": ("64",)})
    assert [s.options.get("group-size") for s in expanded[:2]] == [("64",), ("64",)]
    assert "go to every pass of it that declares an option" in list_passes("md")
    assert "options go to every pass that declares them" in list_passes("text")
