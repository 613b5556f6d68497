"""W4A16 kernel selection: per-device config tables keyed by (N, K, bucketed M), and heuristics.

Pure Python (no triton, no CUDA): `select` is what a lowering pass calls at compile time.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "CONFIG_KEYS",
    "DEQUANT_LINEAR",
    "GEMM",
    "GEMV",
    "KERNELS",
    "M_BUCKETS",
    "ConfigTable",
    "Selection",
    "bucket_m",
    "config_from_values",
    "config_values",
    "fit_config",
    "load_table",
    "reload_tables",
    "select",
    "select_explained",
]

GEMV = "w4a16.gemv"
GEMM = "w4a16.gemm"
DEQUANT_LINEAR = "w4a16.dequant_linear"
AUTO = "w4a16.auto"
"""Not a kernel: pick one at run time from the tables (for graphs whose M is not static)."""

CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    GEMV: ("block_n", "block_k", "split_k", "num_warps", "num_stages"),
    GEMM: ("block_m", "block_n", "block_k", "split_k", "group_m", "num_warps", "num_stages"),
    DEQUANT_LINEAR: ("block_n", "block_k", "num_warps"),
    AUTO: (),
}
"""Config keys of each kernel, in the order `config_values` flattens them for the kernel op."""

KERNELS = (GEMV, GEMM, DEQUANT_LINEAR)
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_TABLE = "default"
_POW2_KEYS = ("block_m", "block_n", "block_k", "split_k", "group_m", "num_warps")


class Selection(NamedTuple):
    """A kernel, its static config, why it was chosen, and whether an (N, K) entry matched."""

    kernel: str
    config: dict[str, int]
    reason: str
    exact: bool = False


def bucket_m(m: int) -> int:
    """The M bucket of a batch size: the smallest bucket >= m (the largest one beyond it)."""
    if m < 1:
        raise ValueError(f"M must be >= 1, got {m}")
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def _pow2_ceil(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- config <-> int[]


def check_config(kernel: str, config: Mapping[str, Any]) -> dict[str, int]:
    """A validated copy of `config` for `kernel`; ValueError names the offending key."""
    if kernel not in CONFIG_KEYS:
        raise ValueError(f"unknown W4A16 kernel {kernel!r}; expected one of {sorted(CONFIG_KEYS)}")
    keys = CONFIG_KEYS[kernel]
    extra = sorted(set(config) - set(keys))
    missing = [k for k in keys if k not in config]
    if extra or missing:
        raise ValueError(
            f"config for {kernel}: unknown keys {extra}, missing keys {missing}; expects {list(keys)}"
        )
    out: dict[str, int] = {}
    for key in keys:
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config for {kernel}: {key}={value!r} must be a positive int")
        if key in _POW2_KEYS and value & (value - 1):
            raise ValueError(f"config for {kernel}: {key}={value} must be a power of two")
        out[key] = value
    for key in ("block_m", "block_k"):
        if key in out and kernel == GEMM and out[key] < 16:
            raise ValueError(f"config for {kernel}: {key}={out[key]} must be >= 16 (tl.dot)")
    if out.get("block_k", 2) < 2:
        raise ValueError(f"config for {kernel}: block_k must be >= 2")
    return out


def config_values(kernel: str, config: Mapping[str, Any]) -> list[int]:
    """Flatten a config dict to the `int[] config` argument of `slimc::triton_linear_w4a16`."""
    checked = check_config(kernel, config)
    return [checked[k] for k in CONFIG_KEYS[kernel]]


def config_from_values(kernel: str, values: list[int] | tuple[int, ...]) -> dict[str, int]:
    """Inverse of `config_values`."""
    if kernel not in CONFIG_KEYS:
        raise ValueError(f"unknown W4A16 kernel {kernel!r}; expected one of {sorted(CONFIG_KEYS)}")
    keys = CONFIG_KEYS[kernel]
    if len(values) != len(keys):
        raise ValueError(
            f"config for {kernel} needs {len(keys)} ints {list(keys)}, got {list(values)}"
        )
    return check_config(kernel, dict(zip(keys, (int(v) for v in values), strict=True)))


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class ConfigTable:
    """One device's table: generic rules by M bucket, plus entries for specific (N, K)."""

    name: str
    status: str
    tuned: bool
    match: tuple[str, ...]
    sms: int
    rules: dict[int, dict[str, Any]]
    shapes: dict[tuple[int, int], dict[int, dict[str, Any]]]

    def lookup(self, n: int, k: int, m: int) -> tuple[dict[str, Any], str, bool] | None:
        """(entry, where it came from, whether it is an (N, K) entry) for (n, k, bucket(m)).

        Within the (N, K) entries, else the generic rules, the largest bucket <= bucket(m) wins.
        """
        bucket = bucket_m(m)
        for where, entries in ((f"N={n},K={k}", self.shapes.get((n, k))), ("rules", self.rules)):
            if not entries:
                continue
            below = [b for b in entries if b <= bucket]
            b = max(below) if below else min(entries)
            reason = f"table {self.name} [{where}, M bucket {b}]" + (
                "" if self.tuned else ", untuned"
            )
            return entries[b], reason, where != "rules"
        return None


def _parse_entries(raw: Mapping[str, Any], where: str) -> dict[int, dict[str, Any]]:
    entries: dict[int, dict[str, Any]] = {}
    for bucket, entry in raw.items():
        if not str(bucket).isdigit() or int(bucket) not in M_BUCKETS:
            raise ValueError(f"{where}: M bucket {bucket!r} is not one of {list(M_BUCKETS)}")
        if not isinstance(entry, dict) or "kernel" not in entry:
            raise ValueError(f"{where}[{bucket}]: expected {{'kernel': ..., 'config': {{...}}}}")
        kernel, config = entry["kernel"], dict(entry.get("config", {}))
        # split_k = 0 means "choose for occupancy" (see fit_config); everything else is checked.
        check_config(kernel, {**config, **({"split_k": 1} if config.get("split_k") == 0 else {})})
        entries[int(bucket)] = {"kernel": kernel, "config": config}
    return entries


def parse_table(name: str, data: Mapping[str, Any]) -> ConfigTable:
    """Build a `ConfigTable` from its JSON form (see docs/kernels.md); ValueError on bad entries."""
    shapes: dict[tuple[int, int], dict[int, dict[str, Any]]] = {}
    for key, raw in data.get("shapes", {}).items():
        parts = key.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"table {name}: shape key {key!r} must be 'N,K'")
        shapes[(int(parts[0]), int(parts[1]))] = _parse_entries(raw, f"table {name} shape {key}")
    return ConfigTable(
        name=name,
        status=str(data.get("status", "")),
        tuned=bool(data.get("tuned", False)),
        match=tuple(s.lower() for s in data.get("match", ())),
        sms=int(data.get("sms", 132)),
        rules=_parse_entries(data.get("rules", {}), f"table {name} rules"),
        shapes=shapes,
    )


@functools.cache
def _tables() -> tuple[ConfigTable, ...]:
    tables = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        tables.append(parse_table(path.stem, json.loads(path.read_text())))
    return tuple(tables)


def reload_tables() -> None:
    """Forget the cached tables (after writing a new configs/*.json)."""
    _tables.cache_clear()


def load_table(device_name: str | None) -> ConfigTable:
    """The table whose `match` substrings occur in `device_name`, else the default table."""
    tables = _tables()
    name = (device_name or "").lower()
    for table in tables:
        if table.name != DEFAULT_TABLE and any(s in name for s in table.match):
            return table
    for table in tables:
        if table.name == DEFAULT_TABLE:
            return table
    raise FileNotFoundError(f"no {DEFAULT_TABLE}.json in {CONFIG_DIR}")


# --------------------------------------------------------------------------- selection


def fit_config(
    kernel: str, config: Mapping[str, Any], n: int, k: int, m: int, group_size: int, sms: int = 132
) -> dict[str, int]:
    """Adapt a table config to one problem: shrink blocks to the shape and the group size.

    block_k is halved until it divides group_size (one scale per K step); split_k = 0 becomes
    enough K splits to give at least one program per SM, capped at 16 and at the K steps.
    """
    cfg = {key: int(v) for key, v in config.items()}
    if kernel in (DEQUANT_LINEAR, AUTO):
        return check_config(kernel, cfg)
    floor_k = 16 if kernel == GEMM else 2
    cfg["block_k"] = max(floor_k, min(cfg["block_k"], _pow2_ceil(k)))
    if group_size != -1:
        while cfg["block_k"] > floor_k and group_size % cfg["block_k"]:
            cfg["block_k"] //= 2
    cfg["block_n"] = max(16, min(cfg["block_n"], _pow2_ceil(n)))
    tiles = _cdiv(n, cfg["block_n"])
    if kernel == GEMM:
        cfg["block_m"] = max(16, min(cfg["block_m"], _pow2_ceil(m)))
        tiles *= _cdiv(m, cfg["block_m"])
    else:
        tiles *= m
    k_steps = _cdiv(k, cfg["block_k"])
    if cfg["split_k"] == 0:
        split = 1
        while split < 16 and tiles * split < sms and split * 2 <= k_steps:
            split *= 2
        cfg["split_k"] = split
    cfg["split_k"] = max(1, min(cfg["split_k"], _pow2_ceil(k_steps)))
    return check_config(kernel, cfg)


def select_explained(
    n: int, k: int, m: int | None, group_size: int, device_name: str | None
) -> Selection:
    """`select`, plus the reason (which table entry or rule) for the KernelBinding."""
    if n < 1 or k < 2 or k % 2:
        raise ValueError(f"W4A16 needs N >= 1 and an even K >= 2, got N={n}, K={k}")
    if group_size != -1 and (group_size < 1 or k % group_size):
        raise ValueError(f"group_size={group_size} does not divide K={k}")
    if m is None:
        return Selection(AUTO, {}, "M is not static: choose per call from the tables")
    table = load_table(device_name)
    found = table.lookup(n, k, m)
    if found is None:
        raise ValueError(f"table {table.name} has neither rules nor an entry for N={n}, K={k}")
    entry, reason, exact = found
    config = fit_config(entry["kernel"], entry["config"], n, k, m, group_size, table.sms)
    return Selection(entry["kernel"], config, reason, exact)


def select(
    n: int, k: int, m: int | None, group_size: int, device_name: str | None
) -> tuple[str, dict[str, int]]:
    """(kernel name, static config) for an [m, k] x [n, k]^T W4A16 linear on `device_name`.

    `m=None` (dynamic batch) gives `("w4a16.auto", {})`, which selects per call at run time.
    """
    sel = select_explained(n, k, m, group_size, device_name)
    return sel.kernel, sel.config
