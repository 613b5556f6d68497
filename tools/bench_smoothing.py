"""Benchmark the smoothing passes on SmolLM2, each next to its no-smoothing baseline; writes docs/benchmarks.md.

Run: python -m slimc.tools.bench_smoothing [--windows 40] [--only-configs NAME ...]
Each configuration runs in its own process (so its peak RSS is its own); results accumulate in
a JSON cache (`--cache`) so a section can be re-measured without redoing the others, and the
table is rendered from that cache. A baseline and its smoothed variants are re-run together.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from slimc.tools.bench_linear_quant import machine, write_section

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


def run_one(pipeline: str, windows: int, calib_samples: int) -> dict[str, object]:
    """Quantize SmolLM2 with `pipeline` (empty: fp32) and measure PPL, time and memory."""
    import torch

    import slimc
    from slimc.data import calibration_samples, eval_token_ids, load_model
    from slimc.evaluate import perplexity
    from slimc.instrumentation import Timer
    from slimc.pass_manager import PassManager

    torch.manual_seed(0)
    model, tok = load_model(None)
    ids = eval_token_ids(tok)
    seconds, smoothing_seconds = 0.0, 0.0
    if pipeline:
        pm = PassManager.parse(pipeline)
        calib = calibration_samples(tok, n=calib_samples) if pm.needs_calibration else None
        timer = Timer()
        start = time.perf_counter()
        model = slimc.compile(
            model, pipeline, calib=calib, progress=False, instrumentations=[timer]
        )
        seconds = time.perf_counter() - start
        smoothing_seconds = sum(t for name, t in timer.times if not _is_quant(name))
    result = perplexity(model, ids, windows=windows, progress=False)
    return {
        "ppl": result.ppl,
        "quant_seconds": seconds,
        "smoothing_seconds": smoothing_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def _is_quant(pass_text: str) -> bool:
    return pass_text.split("{", 1)[0] in ("canonicalize", "linear-quant", "fuse-quantized-linear")


def render(cache: dict[str, dict[str, object]], peers_dir: Path | None) -> str:
    fp32 = cache.get("fp32")
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
    if fp32:
        lines += [f"fp32: PPL {fp32['ppl']:.3f}", ""]
    for section, configs in SECTIONS.items():
        rows = [(name, pipe, cache.get(f"{section}|{name}")) for name, pipe in configs.items()]
        if not any(r for _, _, r in rows):
            continue
        lines += [
            f"### {section}",
            "",
            "| method | pipeline | PPL | vs fp32 | gap to fp32 closed | smoothing s | total s "
            "| peak RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        base = rows[0][2]
        for name, pipe, r in rows:
            if r is None:
                continue
            delta = f"{100 * (r['ppl'] / fp32['ppl'] - 1):+.2f}%" if fp32 else ""
            closed = ""
            if fp32 and base and r is not base:
                gap = base["ppl"] - fp32["ppl"]
                closed = f"{100 * (base['ppl'] - r['ppl']) / gap:.0f}%" if gap > 0 else ""
            lines.append(
                f"| {name} | `{pipe}` | {r['ppl']:.3f} | {delta} | {closed} | "
                f"{r['smoothing_seconds']:.0f} | {r['quant_seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
            )
        if peers_dir is not None:
            lines += _peer_rows(peers_dir, PEERS.get(section, ()))
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def _peer_rows(peers_dir: Path, names: tuple[str, ...]) -> list[str]:
    rows = []
    for name in names:
        path = peers_dir / f"{name}.json"
        if not path.exists():
            if name in PUBLISHED:
                what, ppl = PUBLISHED[name]
                rows.append(
                    f"| peer: {what} (recorded figure, not re-run here) | `{name}` | {ppl:.3f} "
                    "| | | | | |"
                )
            continue
        r = json.loads(path.read_text())
        if r.get("status") != "ok":
            continue
        rows.append(
            f"| peer {r.get('library', '').split(' (')[0]}: {r.get('notes', name).split(';')[0]} "
            f"| `{name}` | "
            f"{r['ppl']:.3f} | | | | {r.get('quant_s', 0.0):.0f} | {r.get('peak_rss_mb', 0.0):.0f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--cache", type=Path, default=Path("out/bench_smoothing.json"))
    parser.add_argument(
        "--sections", nargs="*", default=None, help="sections to (re)measure (default: all)"
    )
    parser.add_argument("--peer-results", type=Path, default=None, help="peer_bench results dir")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the table")
    parser.add_argument(
        "--missing-only", action="store_true", help="measure only rows not in the cache yet"
    )
    parser.add_argument("--pipeline", default=None, help=argparse.SUPPRESS)  # internal: one run
    parser.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pipeline is not None:
        args.json.write_text(json.dumps(run_one(args.pipeline, args.windows, args.calib_samples)))
        return 0
    cache: dict[str, dict[str, object]] = (
        json.loads(args.cache.read_text()) if args.cache.exists() else {}
    )
    if not args.render_only:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        todo = [("fp32", "")]
        for section, configs in SECTIONS.items():
            if args.sections and not any(s in section for s in args.sections):
                continue
            todo += [(f"{section}|{name}", pipe) for name, pipe in configs.items()]
        if args.missing_only:
            todo = [(key, pipe) for key, pipe in todo if key not in cache]
        for key, pipe in todo:
            out = args.cache.with_suffix(".one.json")
            cmd = [sys.executable, "-m", "slimc.tools.bench_smoothing", "--pipeline", pipe]
            cmd += ["--json", str(out), "--windows", str(args.windows)]
            cmd += ["--calib-samples", str(args.calib_samples)]
            subprocess.run(cmd, check=True)
            cache[key] = json.loads(out.read_text())
            r = cache[key]
            print(f"{key:70s} PPL {r['ppl']:.3f}  {r['quant_seconds']:.0f}s", flush=True)
            cache["_meta"] = {
                "command": "python -m slimc.tools.bench_smoothing "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": datetime.date.today().isoformat(),
                "machine": machine(),
                "windows": args.windows,
                "calib_samples": args.calib_samples,
            }
            args.cache.write_text(json.dumps(cache, indent=1))
    write_section(args.out, render(cache, args.peer_results), BEGIN, END)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
