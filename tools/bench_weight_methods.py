"""Benchmark weight methods, rotations and sparsity on SmolLM2 next to RTN; writes docs/benchmarks.md.

Run: python -m slimc.tools.bench_weight_methods [--sections NAME ...] [--rows NAME ...]
     [--peer-results DIR]
Each row runs in its own process (its peak RSS is its own); results accumulate in a JSON cache
(`--cache`) and the table is rendered from it. The first row of a section is its baseline.
"""

from __future__ import annotations

import sys
from pathlib import Path

from slimc.tools._bench_suite import Row, Suite, section_tables

FUSE = "fuse-quantized-linear"
RANDOM_LAYERS = (1, 8, 12, 13, 15, 16, 24, 27, 28)
"""`sorted(random.Random(0).sample(range(30), 9))`: as many SmolLM2 layers as laos's 30%."""

SECTIONS: dict[str, dict[str, str]] = {
    "W4A16 g64 asymmetric (integer zero point)": {
        "RTN": "w4a16{group-size=64}",
        "gptq, MinMax ranges": f"gptq{{group-size=64 range-steps=0}},{FUSE}",
        "gptq": f"gptq{{group-size=64}},{FUSE}",
        "ssz, data-free": f"ssz{{group-size=64 weighting=none}},{FUSE}",
        "ssz": f"ssz{{group-size=64}},{FUSE}",
        "autoround": f"autoround{{group-size=64}},{FUSE}",
        "awq + gptq": f"awq{{group-size=64}},gptq{{group-size=64}},{FUSE}",
    },
    "W4A16 per-channel asymmetric": {
        "RTN": "w4a16",
        "gptq": f"gptq,{FUSE}",
        "ssz, data-free": f"ssz{{weighting=none}},{FUSE}",
        "ssz": f"ssz,{FUSE}",
        "autoround": f"autoround,{FUSE}",
    },
    "W8A8 static per-tensor (Histogram observer)": {
        "no rotation": "w8a8",
        "quarot": "quarot,w8a8",
        "quarot + gptq": f"quarot,gptq{{scheme=w8a8}},{FUSE}",
    },
    "W4A4 (int4 weights per channel x dynamic per-token int4 activations)": {
        "quarot + RTN": "quarot{online-inputs=down_proj},w4a4",
        "quarot + gptq": "w4a4-quarot-gptq",
        "laos, W8A8 on attention and down_proj only": "laos{sensitive-fraction=0}",
        "laos (W8A8 also on gate/up of the 30% most W4A4-sensitive layers)": "laos",
        "laos control: W8A8 also on gate/up of 9 random layers (seed 0)": (
            "adapt-rotation{quant-bits=4},autoround{scheme=w8a8-dynamic only=*self_attn*,"
            "*down_proj,"
            + ",".join(f"*layers.{i}.mlp.gate_proj,*layers.{i}.mlp.up_proj" for i in RANDOM_LAYERS)
            + f"}},autoround{{scheme=w4a4}},{FUSE}"
        ),
        "RTN, no rotation": "w4a4",
    },
    "Float sparse (ADMM, ratio 0.3, fp16 2-bit-mantissa protection)": {
        "float-sparse": "float-sparse{sparse-ratio=0.3}",
    },
}
PEERS: dict[str, tuple[str, ...]] = {
    "W4A16 g64 asymmetric (integer zero point)": (
        "lc_rtn_w4a16_g64_asym",
        "lc_gptq_w4a16_g64_asym",
        "ar_light_w4a16_g64_asym",
        "ar_light_w4a16_g64_asym (auto-round 0.16)",
    ),
}
RECORDED: dict[str, tuple[str, float]] = {
    "lc_gptq_w4a16_g64_asym": ("llm-compressor 0.14 GPTQ W4A16 g64 asym", 14.821),
    "ar_light_w4a16_g64_asym": ("auto-round 0.16 light recipe W4A16 g64 asym", 14.481),
    "ar_light_w4a16_g64_asym (auto-round 0.16)": (
        "auto-round 0.16 light recipe W4A16 g64 asym",
        14.481,
    ),
}
"""Peer figures recorded in the project's data notes (same protocol and machine kind), shown
only where the peer was not re-run into `--peer-results`, and labelled as such."""

BEGIN, END = "<!-- bench_weight_methods:begin -->", "<!-- bench_weight_methods:end -->"


def render(cache: dict[str, Row], peers_dir: Path | None) -> str:
    meta = cache.get("_meta", {})
    lines = [
        BEGIN,
        "## Weight methods, rotations and sparsity on SmolLM2-135M-Instruct",
        "",
        "Command: `python -m slimc.tools.bench_weight_methods --peer-results <peer_bench results "
        "dir>` (rows measured a section or a row at a time with `--sections` / `--rows`; the "
        "date of each row is in the cache)  ",
        f"Date: {meta.get('date', '')}  ",
        f"Machine: {meta.get('machine', '')}  ",
        f"Protocol: data.md, first {meta.get('windows')} windows of 512 tokens; calibration on "
        f"the last {meta.get('calib_samples')} documents. The first row of each section is its "
        'baseline; "gap to fp32 closed" is the share of that baseline\'s PPL gap to fp32 a row removes. '
        '"transform s" is the wall time of every pass other than plain rounding and fusion '
        '(rotation, smoothing, GPTQ / SSZ / AutoRound, sparsification); "total s" adds capture '
        "and quantization. Wall times come from a 2-core machine that other jobs shared at times "
        "(read them as upper bounds). Peak RSS is the whole process. Peer rows are peer_bench "
        "runs on the same protocol, library version in the row; the auto-round re-run used the "
        "version installed beside llm-compressor (0.15.1), and 0.16's recorded figure is shown "
        "next to it.",
        "",
    ]
    lines += section_tables(SECTIONS, cache, "transform s", peers_dir, PEERS, RECORDED)
    lines.append(END)
    return "\n".join(lines)


SUITE = Suite(
    module="slimc.tools.bench_weight_methods",
    sections=SECTIONS,
    render=render,
    begin=BEGIN,
    end=END,
    cache=Path("out/bench_weight_methods.json"),
)


def main(argv: list[str] | None = None) -> int:
    return SUITE.main(argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
