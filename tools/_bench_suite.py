"""Shared driver of the SmolLM2 accuracy benchmarks: one process per row, a JSON cache, a table."""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimc.tools.bench_linear_quant import load_cache, machine, write_section

QUANT_PASSES = ("canonicalize", "linear-quant", "fuse-quantized-linear")
"""Passes counted as quantization (the rest of a pipeline's time is its search / transform)."""

Row = dict[str, Any]


def run_one(pipeline: str, windows: int, calib_samples: int) -> Row:
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
    seconds, search_seconds = 0.0, 0.0
    if pipeline:
        pm = PassManager.parse(pipeline)
        calib = calibration_samples(tok, n=calib_samples) if pm.needs_calibration else None
        timer = Timer()
        start = time.perf_counter()
        model = slimc.compile(
            model, pipeline, calib=calib, progress=False, instrumentations=[timer]
        )
        seconds = time.perf_counter() - start
        search_seconds = sum(
            t for name, t in timer.times if name.split("{", 1)[0] not in QUANT_PASSES
        )
    result = perplexity(model, ids, windows=windows, progress=False)
    return {
        "ppl": result.ppl,
        "quant_seconds": seconds,
        "smoothing_seconds": search_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def peer_rows(
    peers_dir: Path, names: tuple[str, ...], recorded: dict[str, tuple[str, float]], width: int
) -> list[str]:
    """Table rows for peer_bench results (re-run here) or recorded figures (labelled as such).

    Args:
        peers_dir: peer_bench's results directory (`NAME.json` per configuration).
        names: the peer configurations of this section.
        recorded: NAME -> (description, PPL) shown when NAME was not re-run.
        width: number of table columns (PPL is the third, time and memory the last two).
    """
    rows = []
    blanks = " |" * (width - 5)
    for name in names:
        path = peers_dir / f"{name}.json"
        if not path.exists():
            if name in recorded:
                what, ppl = recorded[name]
                rows.append(
                    f"| peer: {what} (recorded figure, not re-run here) | `{name}` | {ppl:.3f} |"
                    + blanks
                    + " | |"
                )
            continue
        r = json.loads(path.read_text())
        if r.get("status") != "ok":
            continue
        what = f"{r.get('library', '').split(' (')[0]}: {r.get('notes', name).split(';')[0]}"
        rows.append(
            f"| peer {what} | `{name}` | {r['ppl']:.3f} |{blanks} "
            f"{r.get('quant_s', 0.0):.0f} | {r.get('peak_rss_mb', 0.0):.0f} |"
        )
    return rows


@dataclass
class Suite:
    """One benchmark script: its sections of rows, cache file and table renderer.

    Attributes:
        module: the script's module name (`python -m` runs it again for each row).
        sections: section title -> {row name -> pipeline string}.
        render: (cache, peer results dir or None) -> the markdown section, markers included.
        begin, end: the markers delimiting the section in docs/benchmarks.md.
        cache: default cache path.
    """

    module: str
    sections: dict[str, dict[str, str]]
    render: Callable[[dict[str, Row], Path | None], str]
    begin: str
    end: str
    cache: Path

    def main(self, argv: list[str] | None = None, description: str = "") -> int:
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--windows", type=int, default=40)
        parser.add_argument("--calib-samples", type=int, default=128)
        parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
        parser.add_argument("--cache", type=Path, default=self.cache)
        parser.add_argument(
            "--sections", nargs="*", default=None, help="sections to (re)measure (default: all)"
        )
        parser.add_argument("--rows", nargs="*", default=None, help="only rows with these names")
        parser.add_argument("--peer-results", type=Path, default=None, help="peer_bench results")
        parser.add_argument("--render-only", action="store_true", help="only rewrite the table")
        parser.add_argument(
            "--missing-only", action="store_true", help="measure only rows not in the cache yet"
        )
        parser.add_argument("--pipeline", default=None, help=argparse.SUPPRESS)  # one run
        parser.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
        args = parser.parse_args(argv)
        if args.pipeline is not None:
            row = run_one(args.pipeline, args.windows, args.calib_samples)
            args.json.write_text(json.dumps(row))
            return 0
        cache: dict[str, Row] = load_cache(args.cache, args.out, self.begin, self.end)
        if not args.render_only:
            self._measure(args, cache, argv)
        write_section(args.out, self.render(cache, args.peer_results), self.begin, self.end)
        print(f"wrote {args.out}")
        return 0

    def _measure(
        self, args: argparse.Namespace, cache: dict[str, Row], argv: list[str] | None
    ) -> None:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        partial = bool(args.sections or args.rows)
        todo = [] if partial and "fp32" in cache else [("fp32", "")]
        for section, configs in self.sections.items():
            if args.sections and not any(s in section for s in args.sections):
                continue
            todo += [
                (f"{section}|{name}", pipe)
                for name, pipe in configs.items()
                if not args.rows or name in args.rows
            ]
        if args.missing_only:
            todo = [(key, pipe) for key, pipe in todo if key not in cache]
        for key, pipe in todo:
            out = args.cache.with_suffix(".one.json")
            cmd = [sys.executable, "-m", self.module, "--pipeline", pipe, "--json", str(out)]
            cmd += ["--windows", str(args.windows), "--calib-samples", str(args.calib_samples)]
            subprocess.run(cmd, check=True)
            cache[key] = json.loads(out.read_text())
            cache[key]["date"] = datetime.date.today().isoformat()
            r = cache[key]
            print(f"{key:70s} PPL {r['ppl']:.3f}  {r['quant_seconds']:.0f}s", flush=True)
            cache["_meta"] = {
                "command": f"python -m {self.module} "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": datetime.date.today().isoformat(),
                "machine": machine(),
                "windows": args.windows,
                "calib_samples": args.calib_samples,
            }
            args.cache.write_text(json.dumps(cache, indent=1))


def section_table(
    title: str,
    configs: dict[str, str],
    cache: dict[str, Row],
    search_column: str,
    peers: list[str],
) -> list[str]:
    """A section's markdown table: its rows (the first is the baseline) then the peer rows.

    Empty when none of the section's rows has been measured.
    """
    fp32 = cache.get("fp32")
    rows = [(name, pipe, cache.get(f"{title}|{name}")) for name, pipe in configs.items()]
    if not any(r for _, _, r in rows):
        return []
    lines = [
        f"### {title}",
        "",
        f"| method | pipeline | PPL | vs fp32 | gap to fp32 closed | {search_column} | total s "
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
    return [*lines, *peers, ""]


def section_tables(
    sections: dict[str, dict[str, str]],
    cache: dict[str, Row],
    search_column: str,
    peers_dir: Path | None,
    peers: dict[str, tuple[str, ...]],
    recorded: dict[str, tuple[str, float]],
) -> list[str]:
    """The fp32 line, then every measured section's table with its peer rows."""
    fp32 = cache.get("fp32")
    lines = [f"fp32: PPL {fp32['ppl']:.3f}", ""] if fp32 else []
    for title, configs in sections.items():
        rows = []
        if peers_dir is not None:
            rows = peer_rows(peers_dir, peers.get(title, ()), recorded, width=8)
        lines += section_table(title, configs, cache, search_column, rows)
    return lines
