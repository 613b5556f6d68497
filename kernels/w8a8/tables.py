"""Per-device kernel config tables keyed by (shape, bucketed M), and a small runtime autotuner.

Shared by the `w8a8`, `fp8` and `hadamard_quant` kernel families. Pure Python: importing this
module never imports triton. A table is one JSON file in the family's `configs/` folder::

    {"tuned": false, "status": "why these numbers", "match": ["h100"],
     "rules":  {"1": {"kernel": "...", "config": {...}}, "64": {...}},
     "shapes": {"4096,4096": {"1": {...}, "256": {...}}}}

`match` lists substrings of the lower-cased device name ("NVIDIA H100 80GB HBM3" -> "h100");
`default.json` (no match) is used for every other device. Shape keys are the family's shape
("N,K" for GEMMs, "N" for the Hadamard family). Within an entry set the largest M bucket <= the
problem's bucket wins, so a table only lists the buckets where the choice changes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

__all__ = [
    "M_BUCKETS",
    "ConfigTable",
    "KernelFamily",
    "Selection",
    "autotune_enabled",
    "bucket_m",
    "cdiv",
    "interpreting",
    "pow2_ceil",
    "tune",
]

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DEFAULT_TABLE = "default"


class Selection(NamedTuple):
    """A kernel, its static config, why it was chosen, and whether a shape entry matched."""

    kernel: str
    config: dict[str, int]
    reason: str
    exact: bool = False


def bucket_m(m: int) -> int:
    """The M bucket of a token count: the smallest bucket >= m (the largest one beyond it)."""
    if m < 1:
        raise ValueError(f"M must be >= 1, got {m}")
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def pow2_ceil(v: int) -> int:
    """The smallest power of two >= v (1 for v <= 1)."""
    return 1 << max(0, (int(v) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def autotune_enabled(env_var: str) -> bool:
    """Runtime autotune of shapes without a table entry: on a real GPU unless `env_var`=0."""
    return not interpreting() and os.environ.get(env_var, "1") != "0"


@dataclass(frozen=True)
class ConfigTable:
    """One device's table: generic rules by M bucket, plus entries for specific shapes."""

    name: str
    status: str
    tuned: bool
    match: tuple[str, ...]
    rules: dict[int, tuple[str, dict[str, int]]]
    shapes: dict[tuple[int, ...], dict[int, tuple[str, dict[str, int]]]]

    def lookup(
        self, shape: tuple[int, ...], m: int
    ) -> tuple[str, dict[str, int], str, bool] | None:
        """(kernel, config, reason, exact) for `shape` at M bucket(m), or None when empty."""
        bucket = bucket_m(m)
        label = ",".join(str(s) for s in shape)
        for where, entries in ((f"shape {label}", self.shapes.get(shape)), ("rules", self.rules)):
            if not entries:
                continue
            below = [b for b in entries if b <= bucket]
            b = max(below) if below else min(entries)
            kernel, config = entries[b]
            reason = f"table {self.name} [{where}, M bucket {b}]"
            reason += "" if self.tuned else " (untuned)"
            return kernel, dict(config), reason, where != "rules"
        return None


@dataclass(frozen=True, eq=False)
class KernelFamily:
    """A kernel family's config schema and its tables.

    Attributes:
        name: the family ("w8a8"), used in messages.
        config_keys: kernel name -> the config keys, in the order of the kernel op's `int[]`.
        config_dir: the folder of the JSON tables.
        shape_arity: ints per shape key (2 for "N,K", 1 for "N").
        pow2_keys: config keys that must be powers of two.
        min_values: smallest allowed value per key (default 1).
    """

    name: str
    config_keys: Mapping[str, tuple[str, ...]]
    config_dir: Path
    shape_arity: int
    pow2_keys: frozenset[str] = frozenset()
    min_values: Mapping[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ config <-> int[]
    def check_config(self, kernel: str, config: Mapping[str, Any]) -> dict[str, int]:
        """A validated copy of `config` for `kernel`; ValueError names the offending key."""
        if kernel not in self.config_keys:
            raise ValueError(
                f"unknown {self.name} kernel {kernel!r}; expected one of {sorted(self.config_keys)}"
            )
        keys = self.config_keys[kernel]
        extra = sorted(set(config) - set(keys))
        missing = [k for k in keys if k not in config]
        if extra or missing:
            raise ValueError(
                f"config for {kernel}: unknown keys {extra}, missing keys {missing}; "
                f"expects {list(keys)}"
            )
        out: dict[str, int] = {}
        for key in keys:
            value = config[key]
            low = self.min_values.get(key, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"config for {kernel}: {key}={value!r} must be an int >= {low}")
            if key in self.pow2_keys and value & (value - 1):
                raise ValueError(f"config for {kernel}: {key}={value} must be a power of two")
            out[key] = value
        return out

    def config_values(self, kernel: str, config: Mapping[str, Any]) -> list[int]:
        """Flatten a config dict to the `int[] config` argument of the family's kernel op."""
        checked = self.check_config(kernel, config)
        return [checked[k] for k in self.config_keys[kernel]]

    def config_from_values(self, kernel: str, values: Sequence[int]) -> dict[str, int]:
        """Inverse of `config_values`; ValueError for an unknown kernel or a wrong count."""
        if kernel not in self.config_keys:
            raise ValueError(
                f"unknown {self.name} kernel {kernel!r}; expected one of {sorted(self.config_keys)}"
            )
        keys = self.config_keys[kernel]
        if len(values) != len(keys):
            raise ValueError(
                f"config for {kernel} needs {len(keys)} ints {list(keys)}, got {list(values)}"
            )
        return self.check_config(kernel, dict(zip(keys, (int(v) for v in values), strict=True)))

    # ------------------------------------------------------------------ tables
    def _entries(self, raw: Mapping[str, Any], where: str) -> dict[int, tuple[str, dict]]:
        entries: dict[int, tuple[str, dict[str, int]]] = {}
        for bucket, entry in raw.items():
            if not str(bucket).isdigit() or int(bucket) not in M_BUCKETS:
                raise ValueError(f"{where}: M bucket {bucket!r} is not one of {list(M_BUCKETS)}")
            if not isinstance(entry, dict) or "kernel" not in entry:
                raise ValueError(f"{where}[{bucket}]: expected {{'kernel': ..., 'config': {{}}}}")
            kernel, config = entry["kernel"], dict(entry.get("config", {}))
            # split_k = 0 means "choose for occupancy" (the family's fit step); check the rest
            probe = {**config, **({"split_k": 1} if config.get("split_k") == 0 else {})}
            self.check_config(kernel, probe)
            entries[int(bucket)] = (kernel, config)
        return entries

    def parse_table(self, name: str, data: Mapping[str, Any]) -> ConfigTable:
        """Build a `ConfigTable` from its JSON form; ValueError naming a bad entry."""
        shapes: dict[tuple[int, ...], dict[int, tuple[str, dict[str, int]]]] = {}
        for key, raw in data.get("shapes", {}).items():
            parts = [p.strip() for p in str(key).split(",")]
            if len(parts) != self.shape_arity or not all(p.isdigit() for p in parts):
                want = "N,K" if self.shape_arity == 2 else "N"
                raise ValueError(f"{self.name} table {name}: shape key {key!r} must be '{want}'")
            shape = tuple(int(p) for p in parts)
            shapes[shape] = self._entries(raw, f"{self.name} table {name} shape {key}")
        return ConfigTable(
            name=name,
            status=str(data.get("status", "")),
            tuned=bool(data.get("tuned", False)),
            match=tuple(s.lower() for s in data.get("match", ())),
            rules=self._entries(data.get("rules", {}), f"{self.name} table {name} rules"),
            shapes=shapes,
        )

    def tables(self) -> tuple[ConfigTable, ...]:
        return _load_tables(self)

    def load_table(self, device_name: str | None) -> ConfigTable:
        """The table whose `match` substrings occur in `device_name`, else the default one."""
        tables = self.tables()
        name = (device_name or "").lower()
        for table in tables:
            if table.name != DEFAULT_TABLE and any(s in name for s in table.match):
                return table
        for table in tables:
            if table.name == DEFAULT_TABLE:
                return table
        raise FileNotFoundError(f"no {DEFAULT_TABLE}.json in {self.config_dir}")

    def lookup(
        self, shape: tuple[int, ...], m: int, device_name: str | None
    ) -> tuple[str, dict[str, int], str, bool]:
        """(kernel, raw config, reason, exact) from the device's table."""
        table = self.load_table(device_name)
        found = table.lookup(shape, m)
        if found is None:
            raise ValueError(f"{self.name} table {table.name} has no rules and no entry {shape}")
        return found


@functools.cache
def _load_tables(family: KernelFamily) -> tuple[ConfigTable, ...]:
    return tuple(
        family.parse_table(path.stem, json.loads(path.read_text()))
        for path in sorted(family.config_dir.glob("*.json"))
    )


# --------------------------------------------------------------------------- runtime autotune

_TUNED: dict[tuple[Any, ...], tuple[str, dict[str, int]]] = {}


def tune(
    key: tuple[Any, ...],
    candidates: Sequence[tuple[str, dict[str, int]]],
    run: Callable[[str, dict[str, int]], Any],
    fallback: tuple[str, dict[str, int]],
) -> tuple[str, dict[str, int]]:
    """Benchmark `candidates` once per `key` (triton.testing.do_bench) and cache the fastest.

    A candidate that fails to compile or launch is skipped; `fallback` wins when all fail.
    Only for real GPUs: callers check `autotune_enabled` first.
    """
    if key in _TUNED:
        return _TUNED[key]
    from triton.testing import do_bench

    best = (float("inf"), *fallback)
    for kernel, cfg in candidates:
        try:
            ms = do_bench(lambda k=kernel, c=cfg: run(k, c), warmup=5, rep=20)
        except Exception as exc:  # a config that does not compile or fit is skipped
            logger.debug("autotune %s: %s %s failed: %s", key, kernel, cfg, exc)
            continue
        if ms < best[0]:
            best = (ms, kernel, cfg)
    logger.info("autotune %s: %s %s (%.1f us)", key, best[1], best[2], best[0] * 1e3)
    _TUNED[key] = (best[1], best[2])
    return _TUNED[key]
