"""A memory cap for one benchmark subprocess: a child cgroup (v2, else v1) or a systemd scope."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slimc.errors import UserError


@dataclass
class MemoryCap:
    """How a subprocess is held under `limit_bytes`.

    Attributes:
        kind: 'cgroup-v2', 'cgroup-v1' or 'systemd-run'.
        limit_bytes: the cap (page cache counts, but the kernel reclaims it first).
        parent: the cgroup directory the child cgroup is made in (cgroups only).
        child: the child cgroup once made.
    """

    kind: str
    limit_bytes: int
    parent: Path | None = None
    child: Path | None = field(default=None, init=False)

    def describe(self) -> str:
        where = f" under {self.parent}" if self.parent else ""
        return f"{self.limit_bytes / 2**20:.0f} MiB via {self.kind}{where}"

    def prefix(self) -> list[str]:
        """Command words put before the benchmarked command (systemd-run only)."""
        if self.kind != "systemd-run":
            return []
        return [
            "systemd-run",
            "--scope",
            "--quiet",
            "-p",
            f"MemoryMax={self.limit_bytes}",
            "-p",
            "MemorySwapMax=0",
        ]

    def make(self, name: str) -> None:
        """Create the child cgroup `name` with the limit (cgroups only)."""
        if self.parent is None:
            return
        child = self.parent / name
        child.mkdir()
        self.child = child
        if self.kind == "cgroup-v2":
            (child / "memory.max").write_text(str(self.limit_bytes))
            if (child / "memory.swap.max").exists():
                (child / "memory.swap.max").write_text("0")
        else:
            (child / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
            memsw = child / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # no swapping past the cap either
                memsw.write_text(str(self.limit_bytes))

    def enter(self) -> Callable[[], None] | None:
        """A `preexec_fn` that moves the forked child into the cgroup before it runs anything."""
        if self.child is None:
            return None
        procs = str(self.child / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return join

    def usage(self) -> dict[str, int]:
        """The cgroup's peak memory (page cache included) and OOM kills, as far as it reports them."""
        if self.child is None:
            return {}
        out: dict[str, int] = {}
        peak = "memory.peak" if self.kind == "cgroup-v2" else "memory.max_usage_in_bytes"
        if (self.child / peak).exists():
            out["cgroup_peak_bytes"] = int((self.child / peak).read_text().split()[0])
        events = self.child / (
            "memory.events" if self.kind == "cgroup-v2" else "memory.oom_control"
        )
        if events.exists():
            for line in events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    out["oom_kills"] = int(value)
        return out

    def remove(self) -> None:
        """Remove the child cgroup (its processes have exited)."""
        if self.child is not None and self.child.exists():
            self.child.rmdir()
        self.child = None


def _mounts(fstype: str) -> list[tuple[Path, set[str]]]:
    """Mount points of `fstype` with their options, from /proc/self/mounts."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == fstype:
            found.append((Path(parts[1]), set(parts[3].split(","))))
    return found


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per hierarchy: '' for v2, else the controller list ('memory')."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def find_memory_cap(limit_bytes: int) -> tuple[MemoryCap | None, list[str]]:
    """The first way to cap a subprocess that works here, else None and why each did not."""
    why: list[str] = []
    own = _own_cgroups()
    for mount, _ in _mounts("cgroup2"):
        here = mount / own.get("", "/").lstrip("/")
        control = here / "cgroup.subtree_control"
        if not control.exists():
            why.append(f"cgroup v2 at {here}: no cgroup.subtree_control")
        elif "memory" not in control.read_text().split():
            why.append(f"cgroup v2 at {here}: the memory controller is not delegated to children")
        elif not _writable(here):
            why.append(f"cgroup v2 at {here}: not writable")
        else:
            return MemoryCap("cgroup-v2", limit_bytes, here), why
    for mount, options in _mounts("cgroup"):
        if "memory" not in options:
            continue
        here = mount / own.get("memory", "/").lstrip("/")
        if _writable(here) and (here / "memory.limit_in_bytes").exists():
            return MemoryCap("cgroup-v1", limit_bytes, here), why
        why.append(f"cgroup v1 memory at {here}: not writable")
    if not why:
        why.append("no cgroup memory controller is mounted")
    if Path("/run/systemd/system").is_dir() and shutil.which("systemd-run"):
        return MemoryCap("systemd-run", limit_bytes), why
    why.append("systemd is not running (no systemd-run --scope)")
    return None, why


def require_memory_cap(limit_bytes: int) -> MemoryCap:
    """`find_memory_cap` or a one-line UserError saying why no cap can be set here."""
    cap, why = find_memory_cap(limit_bytes)
    if cap is None:
        raise UserError("--cap-fraction: cannot cap memory on this machine: " + "; ".join(why))
    return cap
