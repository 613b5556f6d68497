"""Benchmark the smoothing passes on SmolLM2, each next to its no-smoothing baseline; writes docs/benchmarks.md.

Run: python -m slimc.tools.bench_smoothing [--windows 40] [--only-configs NAME ...]
Each configuration runs in its own process (so its peak RSS is its own); results accumulate in
a JSON cache (`--cache`) so a section can be re-measured without redoing the others, and the
table is rendered from that cache. A baseline and its smoothed variants are re-run together.
"""

from __future__ import annotations

import sys
from pathlib import Path

from slimc.tools._bench_suite import Row, Suite, section_tables

SECTIONS: dict[str, dict[str, str]] = {
    "W8A8 static per-tensor (Histogram observer)": {
        "no smoothing": "w8a8",
        "smooth-quant (alpha 0.5, norm-linear)": "smooth-quant,w8a8",
        "iter-smooth (alpha 0.9, all kinds)": "iter-smooth,w8a8",
        "iter-smooth + channel shift (asymmetric)": "iter-smooth{shift=true},w8a8",
        "flex-smooth-quant (searched, per-tensor target)": (
            "flex-smooth-quant{act-quant=per-tensor},w8a8"
        ),
    },
    "W8A8 dynamic per-token": {
        "no smoothing": "w8a8-dynamic",
        "smooth-quant (alpha 0.5, all kinds)": (
            "smooth-quant{enable-subgraph-type=norm-linear,ov,up-down},w8a8-dynamic"
        ),
        "iter-smooth (alpha 0.9)": "iter-smooth,w8a8-dynamic",
        "flex-smooth-quant (searched, per-token target)": "flex-smooth-quant,w8a8-dynamic",
        "flex-smooth-quant, 4096 search tokens": (
            "flex-smooth-quant{max-tokens=4096},w8a8-dynamic"
        ),
    },
    "W4A16 g64 asymmetric (integer zero point)": {
        "no smoothing (RTN)": "w4a16{group-size=64}",
        "awq": "awq{group-size=64},w4a16{group-size=64}",
        "flex-awq-ssz": "flex-awq-ssz{group-size=64 act-quant=none},w4a16{group-size=64}",
    },
    "W4A16 per-channel asymmetric": {
        "no smoothing (RTN)": "w4a16",
        "awq": "awq,w4a16",
    },
}
PEERS: dict[str, tuple[str, ...]] = {
    "W8A8 static per-tensor (Histogram observer)": (
        "lc_w8a8_static",
        "lc_sq_w8a8_static",
        "lc_sqdown_w8a8_static",
    ),
    "W8A8 dynamic per-token": ("lc_w8a8_rtn", "lc_sq_gptq_w8a8"),
    "W4A16 g64 asymmetric (integer zero point)": (
        "lc_rtn_w4a16_g64_asym",
        "lc_awq_w4a16_g64_asym_pinfix",
    ),
    "W4A16 per-channel asymmetric": ("lc_awq_w4a16_ch_sym_pinfix",),
}
PUBLISHED: dict[str, tuple[str, float]] = {
    "lc_sqdown_w8a8_static": (
        "llm-compressor 0.14 SmoothQuant(0.8) + up->down mapping, static",
        18.83,
    ),
    "lc_sq_gptq_w8a8": ("llm-compressor 0.14 SmoothQuant(0.8) + GPTQ W8A8", 13.476),
    "lc_awq_w4a16_g64_asym_pinfix": ("llm-compressor 0.14 AWQ W4A16 g64 asym", 15.611),
}
"""Peer figures recorded in the project's data notes (same protocol and machine kind), shown
only where the peer was not re-run into `--peer-results`, and labelled as such."""

BEGIN, END = "<!-- bench_smoothing:begin -->", "<!-- bench_smoothing:end -->"


def render(cache: dict[str, Row], peers_dir: Path | None) -> str:
    meta = cache.get("_meta", {})
    lines = [
        BEGIN,
        "## Smoothing on SmolLM2-135M-Instruct",
        "",
        "Command: `python -m slimc.tools.bench_smoothing --peer-results <peer_bench results dir>` "
        "(sections were measured one at a time with `--sections NAME`; each section's rows "
        "in one invocation)  ",
        f"Date: {meta.get('date', '')}  ",
        f"Machine: {meta.get('machine', '')}  ",
        f"Protocol: data.md, first {meta.get('windows')} windows of 512 tokens; calibration on the "
        f"last {meta.get('calib_samples')} documents (smoothing statistics and static ranges). "
        "A section's baseline ran in the same invocation as its first smoothed rows; rows added "
        "to a section later were run with `--missing-only` the same day on the same code. "
        "Times are wall clock on a 2-core machine that was at times shared with other jobs "
        "(test runs, other benchmark processes), so read them as upper bounds. "
        '"smoothing s" is the wall time of the smoothing pass (statistics + search + fold); '
        '"total s" adds capture and quantization. Peak RSS is the whole process.',
        "",
    ]
    lines += section_tables(SECTIONS, cache, "smoothing s", peers_dir, PEERS, PUBLISHED)
    lines.append(END)
    return "\n".join(lines)


SUITE = Suite(
    module="slimc.tools.bench_smoothing",
    sections=SECTIONS,
    render=render,
    begin=BEGIN,
    end=END,
    cache=Path("out/bench_smoothing.json"),
)


def main(argv: list[str] | None = None) -> int:
    return SUITE.main(argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
