"""Save programs as `.pt2` files (crash reproducers, `slimc-opt -o`) and load them back as is."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.export import Dim

import slimc
import slimc.ops  # noqa: F401  (the graphs written and loaded call slimc:: ops)
from slimc.capture import program_from_graph_module
from slimc.errors import UserError, first_line
from slimc.program import LOC_KEY, SCHEME_KEY, Program
from slimc.quant.scheme import LinearQuantScheme, TensorQuantSpec
from slimc.stage import Stage

log = logging.getLogger(__name__)

PIPELINE_FILE = "slimc_pipeline"
"""Extra file holding the pipeline still to run (a reproducer's failing pass and the rest)."""
STAGE_FILE = "slimc_stage"
"""Extra file holding the program's stage label (`aten`, `qdq`, ...)."""
VERSION_FILE = "slimc_version"
"""Extra file holding the slimc and torch versions that wrote the file."""
NODES_FILE = "slimc_nodes"
"""Extra file (JSON) restoring names, order and locations of nodes export recreates."""
EXTRA_FILES = (PIPELINE_FILE, STAGE_FILE, VERSION_FILE, NODES_FILE)

_CUSTOM = "custom"  # node.meta key that torch.export keeps through tracing and serialization
_NAME, _ORDER, _LOC, _SCHEME = "slimc_name", "slimc_order", "slimc_loc", "slimc_scheme"


def _version() -> str:
    return f"slimc {slimc.__version__}, torch {torch.__version__}"


def _record(node: fx.Node, order: int) -> list[Any]:
    return [node.name, order, node.meta.get(LOC_KEY)]


def _annotate(gm: fx.GraphModule) -> dict[str, Any]:
    """Stamp every node with what a save/load round trip loses; return the side table."""
    scheme_key = SCHEME_KEY
    table: dict[str, Any] = {"placeholders": [], "consts": {}, "sym_sizes": {}}
    placeholders: dict[fx.Node, int] = {}
    for order, node in enumerate(gm.graph.nodes):
        custom = dict(node.meta.get(_CUSTOM) or {})
        custom.update({_NAME: node.name, _ORDER: order})
        if node.meta.get(LOC_KEY):
            custom[_LOC] = node.meta[LOC_KEY]
        scheme = node.meta.get(scheme_key)
        if scheme is not None:
            custom[_SCHEME] = dataclasses.asdict(scheme)
        node.meta[_CUSTOM] = custom
        if node.op == "placeholder":
            placeholders[node] = len(placeholders)
            table["placeholders"].append(_record(node, order))
        elif node.op == "get_attr":
            table["consts"].setdefault(str(node.target), _record(node, order))
        elif node.target is torch.ops.aten.sym_size.int and node.args[0] in placeholders:
            key = f"{placeholders[node.args[0]]}:{node.args[1]}"  # type: ignore[index]
            table["sym_sizes"].setdefault(key, _record(node, order))
    return table


def _dynamic_shapes(gm: fx.GraphModule) -> tuple[dict[int, Any], ...] | None:
    """Keep every symbolic input dimension dynamic when re-exporting."""
    specs: list[dict[int, Any]] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        shape = val.shape if isinstance(val, torch.Tensor) else ()
        specs.append({i: Dim.DYNAMIC for i, d in enumerate(shape) if not isinstance(d, int)})
    return tuple(specs) if any(specs) else None


def save_program(program: Program, path: str | Path, pipeline: str = "") -> str:
    """Write `program` as a `.pt2` (re-exported non-strict with its example inputs).

    `pipeline` is stored so that `slimc-opt FILE` without `-p` runs it.

    Raises:
        UserError: the program has no example inputs or cannot be exported.
    """
    if not program.example_inputs:
        raise UserError("cannot save a program without example inputs")
    with warnings.catch_warnings():  # torch's pytree specs warn when deep-copied
        warnings.filterwarnings("ignore", "`isinstance.treespec, LeafSpec.`", FutureWarning)
        with program.materialized():
            gm = copy.deepcopy(program.graph_module)
    table = _annotate(gm)
    gm.recompile()
    try:
        with torch.no_grad():
            ep = torch.export.export(
                gm, tuple(program.example_inputs), dynamic_shapes=_dynamic_shapes(gm), strict=False
            )
    except Exception as exc:
        reason = first_line(exc)
        where = f"the {program.stage.label} program to {path}"
        raise UserError(f"cannot export {where}: {reason}") from exc
    extra = {
        PIPELINE_FILE: pipeline,
        STAGE_FILE: program.stage.label,
        VERSION_FILE: _version(),
        NODES_FILE: json.dumps(table),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path), extra_files=extra)
    log.info("wrote %s (%s stage)", path, program.stage.label)
    return str(path)


def write_reproducer(program: Program, pipeline_tail: str, path: str) -> str:
    """Save the IR from before a failing pass with the pipeline from that pass on.

    Called by the PassManager when a pass fails and `crash_reproducer` is set. Never raises:
    a reproducer that cannot be written is logged and an empty path returned, so the original
    failure is what the user sees.
    """
    try:
        return save_program(program, path, pipeline_tail)
    except Exception as exc:  # noqa: BLE001 - must not hide the pass failure
        log.error("could not write crash reproducer %s: %s", path, exc)
        return ""


def read_metadata(path: str | Path) -> dict[str, str]:
    """The slimc extra files of a `.pt2` (empty strings when absent), read without loading it.

    Raises:
        UserError: the file is missing or not a `.pt2` archive.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"input {p} does not exist")
    found = dict.fromkeys(EXTRA_FILES, "")
    try:
        with zipfile.ZipFile(p) as zf:
            for name in zf.namelist():
                head, _, leaf = name.rpartition("/")
                if head.endswith("extra") and leaf in found:
                    found[leaf] = zf.read(name).decode("utf-8")
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{p} is not a .pt2 archive ({exc})") from None
    return found


def stage_of(meta: dict[str, str]) -> Stage:
    label = meta.get(STAGE_FILE) or "aten"
    try:
        return Stage.parse(label)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def load_program(path: str | Path) -> tuple[Program, str]:
    """Load a `.pt2` written by `torch.export.save` (by slimc or not) as a canonical Program.

    Returns:
        The program (at the stage stored in the file, else `aten`) and the stored pipeline ("").

    Raises:
        UserError: missing, corrupt or input-less file.
    """
    meta = read_metadata(path)
    stage = stage_of(meta)
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        reason = first_line(exc)
        raise UserError(f"cannot load {path}: {reason}") from exc
    if ep.example_inputs is None:
        raise UserError(f"{path} has no example inputs; save it with torch.export.save(ep)")
    args, kwargs = ep.example_inputs
    if kwargs:
        raise UserError(f"{path}: programs with keyword inputs are not supported")
    gm = ep.module()
    if meta[NODES_FILE]:
        _restore(gm, json.loads(meta[NODES_FILE]))
    program = program_from_graph_module(gm, args, stage=stage)
    program.metadata["source"] = str(path)
    return program, meta[PIPELINE_FILE]


def _restore(gm: fx.GraphModule, table: dict[str, Any]) -> None:
    """Give nodes back their names, order, locations and schemes (see `_annotate`)."""
    scheme_key = SCHEME_KEY
    info: dict[fx.Node, list[Any]] = {}
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for node, rec in zip(placeholders, table["placeholders"], strict=False):
        info[node] = rec
    for node in gm.graph.nodes:
        custom = node.meta.get(_CUSTOM) or {}
        if _NAME in custom:
            info[node] = [custom[_NAME], custom[_ORDER], custom.get(_LOC)]
        elif node.op == "get_attr" and str(node.target) in table["consts"]:
            info[node] = table["consts"].pop(str(node.target))
        elif node.target is torch.ops.aten.sym_size.int and node.args[0] in placeholders:
            key = f"{placeholders.index(node.args[0])}:{node.args[1]}"  # type: ignore[arg-type]
            if key in table["sym_sizes"]:
                info[node] = table["sym_sizes"].pop(key)
        if _SCHEME in custom:
            raw = custom[_SCHEME]
            act = raw["activation"]
            activation = TensorQuantSpec(**act) if act else None
            node.meta[scheme_key] = LinearQuantScheme(
                raw["name"], TensorQuantSpec(**raw["weight"]), activation
            )
        rest = {k: v for k, v in custom.items() if not k.startswith("slimc_")}
        if rest:
            node.meta[_CUSTOM] = rest
        else:
            node.meta.pop(_CUSTOM, None)
    for node, (_, _, loc) in info.items():
        if loc:
            node.meta[LOC_KEY] = loc
        else:
            node.meta.pop("nn_module_stack", None)  # no location then, none now
    _rebuild(gm, info)


def _rebuild(gm: fx.GraphModule, info: dict[fx.Node, list[Any]]) -> None:
    """Copy the graph in its original node order with the original names."""
    gm.graph.eliminate_dead_code()  # export may trace a node twice; keep the live copy
    keys: dict[fx.Node, float] = {}
    for node in gm.graph.nodes:
        if node in info:
            keys[node] = float(info[node][1])
        else:  # created by export: right after its last input
            deps = [keys[n] for n in node.all_input_nodes if n in keys]
            keys[node] = max(deps, default=-1.0) + 0.5
    current = {n: i for i, n in enumerate(gm.graph.nodes)}
    order = sorted(gm.graph.nodes, key=lambda n: (n.op == "output", keys[n], current[n]))
    seen: set[fx.Node] = set()
    for node in order:
        if any(dep not in seen for dep in node.all_input_nodes):
            order = list(gm.graph.nodes)  # not a valid schedule: keep export's order
            break
        seen.add(node)
    graph = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    claimed: set[str] = set()
    later: list[tuple[fx.Node, str]] = []  # duplicates and new nodes: named once all are placed
    for i, node in enumerate(order):
        want = info[node][0] if node in info else node.name
        name = want if node in info and want not in claimed else f"_slimc_unnamed_{i}"
        claimed.add(want)
        if node.op == "output":
            new = graph.output(fx.node.map_arg(node.args[0], env.__getitem__), node.type)
        else:
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            new = graph.create_node(node.op, node.target, args, kwargs, name, node.type)
            if name != want:
                later.append((new, want))
        new.meta = copy.copy(node.meta)
        env[node] = new
    for new, want in later:
        new._rename(want)
    gm.graph = graph
    gm.recompile()
