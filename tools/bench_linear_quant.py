"""Benchmark plain linear quantization schemes on SmolLM2 and write docs/benchmarks.md.

Run: python -m slimc.tools.bench_linear_quant [--windows 40] [--calib-samples 128]
Each configuration runs in its own process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, str] = {
    "fp32": "",
    "W8A16": "w8a16",
    "W8A8 dynamic (per-token)": "w8a8-dynamic",
    "W8A8 static, MinMax": "w8a8{observer=minmax}",
    "W8A8 static, Histogram (default)": "w8a8",
    "W4A16 per-channel asym": "w4a16",
    "W4A16 g64 asym": "w4a16{group-size=64}",
    "W4A8 dynamic": "w4a8",
}
BEGIN, END = "<!-- bench_linear_quant:begin -->", "<!-- bench_linear_quant:end -->"


def run_one(pipeline: str, windows: int, calib_samples: int) -> dict[str, float]:
    import torch

    import slimc
    from slimc.data import calibration_samples, eval_token_ids, load_model
    from slimc.evaluate import perplexity
    from slimc.pass_manager import PassManager

    torch.manual_seed(0)
    model, tok = load_model(None)
    ids = eval_token_ids(tok)
    seconds = 0.0
    if pipeline:
        pm = PassManager.parse(pipeline)
        calib = calibration_samples(tok, n=calib_samples) if pm.needs_calibration else None
        start = time.perf_counter()
        model = slimc.compile(model, pipeline, calib=calib, progress=False)
        seconds = time.perf_counter() - start
    result = perplexity(model, ids, windows=windows, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "ppl": result.ppl,
        "quant_seconds": seconds,
        "peak_rss_mb": peak,
        "eval_seconds": result.seconds,
    }


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def render(results: dict[str, dict[str, float]], args: argparse.Namespace, command: str) -> str:
    fp32 = results["fp32"]["ppl"]
    lines = [
        BEGIN,
        "## Plain linear quantization on SmolLM2-135M-Instruct",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}  ",
        f"Protocol: data.md, first {args.windows} windows of 512 tokens of the wiki text; "
        f"static activations calibrated on the last {args.calib_samples} documents. "
        'fp32 is the dequantized GGUF checkpoint ("fp32 self", caveat C1). '
        "Peak RSS is the whole process (model load, capture, quantization, evaluation).",
        "",
        "| configuration | pipeline | PPL | delta vs fp32 | quantization time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, pipeline in CONFIGS.items():
        r = results[name]
        delta = "" if name == "fp32" else f"{100 * (r['ppl'] / fp32 - 1):+.2f}%"
        quant = "" if name == "fp32" else f"{r['quant_seconds']:.1f}"
        lines.append(
            f"| {name} | `{pipeline or '-'}` | {r['ppl']:.3f} | {delta} | {quant} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    if args.peer_results is not None:
        lines += ["", *render_peers(args.peer_results)]
    lines.append(END)
    return "\n".join(lines)


def render_peers(results_dir: Path) -> list[str]:
    """A table of peer runs made with ../shared/peer_bench (its results/*.json records)."""
    records = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    lines = [
        f"Peers on the same protocol, run on this machine with the peer_bench scripts "
        f"(`run_peers.py --config NAME`, results read from `{results_dir}`):",
        "",
        "| peer config | library | PPL | quantization time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("status") != "ok":
            continue
        lines.append(
            f"| {r['config']} | {r.get('library', '')} | {r['ppl']:.3f} | "
            f"{r.get('quant_s', 0.0):.1f} | {r.get('peak_rss_mb', 0.0):.0f} |"
        )
    return lines


def load_cache(cache: Path, doc: Path, begin: str, end: str) -> dict[str, Any]:
    """The rows cached in `cache`; an error when it is missing while `doc` already has the
    section: rendering from an empty cache would drop the rows measured before."""
    if cache.exists():
        return json.loads(cache.read_text())
    text = doc.read_text() if doc.exists() else ""
    if begin in text and end in text:
        raise SystemExit(
            f"error: {cache} is missing, and {doc} already holds the section it renders; "
            "running now would drop the rows measured before. Restore the cache (an earlier "
            "run wrote it) or remove the section from the document first."
        )
    return {}


def write_section(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between `begin` and `end` in `path` (append it if the markers are absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument(
        "--peer-results", type=Path, default=None, help="peer_bench results dir to tabulate too"
    )
    parser.add_argument("--only", default=None, help="run one configuration (internal)")
    parser.add_argument("--json", type=Path, default=None, help="result file for --only (internal)")
    args = parser.parse_args(argv)
    if args.only is not None:
        result = run_one(CONFIGS[args.only], args.windows, args.calib_samples)
        args.json.write_text(json.dumps(result))
        return 0
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            out = Path(tmp) / "r.json"
            cmd = [
                sys.executable,
                "-m",
                "slimc.tools.bench_linear_quant",
                "--only",
                name,
                "--json",
                str(out),
                "--windows",
                str(args.windows),
                "--calib-samples",
                str(args.calib_samples),
            ]
            subprocess.run(cmd, check=True)
            results[name] = json.loads(out.read_text())
            print(
                f"{name:28s} PPL {results[name]['ppl']:.3f}  quant {results[name]['quant_seconds']:.1f}s  "
                f"peak {results[name]['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    command = "python -m slimc.tools.bench_linear_quant " + " ".join(argv or sys.argv[1:])
    write_section(args.out, render(results, args, command.strip()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
