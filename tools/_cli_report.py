"""The summary `slimc quant` prints: wall time per stage, the result table, peak RSS."""

from __future__ import annotations

import resource
import time


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StageClock:
    """Wall time per stage of a run, for the summary: `lap(name)` adds the time since the last lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

    def summary(self) -> str:
        """`time per stage: load 1.2 s, ...` and a line with the process's peak RSS."""
        stages = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return f"time per stage: {stages}\npeak RSS: {kib / 1024:.0f} MB ({kib} KiB)"


def table(rows: list[tuple[str, ...]]) -> str:
    """Rows as aligned columns, a rule under the first (the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
