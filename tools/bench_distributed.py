"""One process against N torchrun ranks: the same `slimc quant` run, its PPL, time and peak RSS per rank.

Run: python -m slimc.tools.bench_distributed [--model DIR] [--ranks 2] -- --quant-type w8a8 ...

Both runs quantize the same model with the same arguments, calibration set and seed; each
checkpoint and the float model are then measured with `slimc eval` on the wiki windows of the
evaluation protocol and on held-out text (Python's reference topics, which no calibration set
uses). The section "Calibration across processes" of docs/benchmarks.md is rewritten between its
markers from a JSON cache (`--cache`), one table per set of `slimc quant` arguments; the
machine's load before and after is written beside the times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from slimc.tools.bench_linear_quant import load_cache, write_section
from slimc.tools.bench_memory import TIME, cpu_model, idle_note, load_average, parse_time_v

BEGIN = "<!-- bench_distributed:begin -->"
END = "<!-- bench_distributed:end -->"
RANK_RSS = re.compile(r"rank (\d+) of \d+: peak RSS (\d+) MB")
PPL = re.compile(r"^PPL (\d+\.\d+)", re.MULTILINE)


def held_out_text(path: Path) -> Path:
    """Python's reference topics (stdlib `pydoc_data`), written to `path`: text in no
    calibration set."""
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path


def timed(command: list[str]) -> tuple[dict[str, Any], str]:
    """Run `command` under `/usr/bin/time -v`: (its report, its stderr). The one process uses
    every core (torch's default threads); torchrun gives each rank one thread.

    Raises:
        RuntimeError: the command failed (its stderr's tail is in the message).
    """
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = subprocess.run([TIME, "-v", *command], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{run.stderr[-3000:]}")
    return parse_time_v(run.stderr), run.stderr


def perplexity(model: Path, windows: int, text: str) -> float:
    """`slimc eval`'s PPL of `model` on `windows` windows of `text` ('wiki' or a file)."""
    command = [sys.executable, "-m", "slimc.tools.cli", "eval", "--model", str(model)]
    command += ["--windows", str(windows), "--text", text]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    found = PPL.search(run.stdout)
    if found is None:
        raise RuntimeError(f"no PPL in the output of {shlex.join(command)}:\n{run.stdout}")
    return float(found.group(1))


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Both runs and the PPL of both checkpoints and of the float model."""
    quant = ["-m", "slimc.tools.cli", "quant", *(["--model", args.model] if args.model else [])]
    quant += args.quant_args
    before = load_average()
    one, _ = timed([sys.executable, *quant, "--save", str(work / "one")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc-per-node", str(args.ranks)]
    many, stderr = timed([*torchrun, *quant, "--save", str(work / "many")])
    after = load_average()
    ranks = {int(r): int(mb) for r, mb in RANK_RSS.findall(stderr)}
    text = str(held_out_text(work / "held_out.txt"))
    float_model = Path(args.model) if args.model else None
    ppl: dict[str, dict[str, float]] = {}
    for label, model in (("fp32", float_model), ("one", work / "one"), ("many", work / "many")):
        if model is None:  # the packaged model: `slimc eval` finds it without --model
            from slimc.data import model_directory

            model = model_directory(None)
        ppl[label] = {
            "wiki": perplexity(model, args.windows, "wiki"),
            "held_out": perplexity(model, args.held_out_windows, text),
        }
    return {
        "one": one,
        "many": many,
        "ranks": ranks,
        "ppl": ppl,
        "idle": idle_note(before, after),
        "date": datetime.date.today().isoformat(),
        "machine": cpu_model(),
    }


def render_one(result: dict[str, Any]) -> list[str]:
    """One configuration's lines: the command, the machine and the table."""
    ppl, n = result["ppl"], result["ranks_count"]

    def delta(text: str) -> str:
        return f"{100 * (ppl['many'][text] / ppl['one'][text] - 1):+.3f}%"

    rank_rss = ", ".join(f"rank {r} {mb} MB" for r, mb in sorted(result["ranks"].items()))
    return [
        f"### `{result['command']}`",
        "",
        f"{result['date']}, {result['machine']}; machine {result['idle']}. Model: "
        f"{result['model']}. Held-out text: Python's reference topics "
        f"({result['held_out_windows']} windows of 512 tokens).",
        "",
        "| run | wiki PPL (40 windows) | held-out PPL | vs one process | wall s | peak RSS |",
        "|---|---|---|---|---|---|",
        f"| fp32 | {ppl['fp32']['wiki']:.3f} | {ppl['fp32']['held_out']:.3f} | | | |",
        f"| one process | {ppl['one']['wiki']:.3f} | {ppl['one']['held_out']:.3f} | | "
        f"{result['one']['wall_s']:.1f} | {result['one']['peak_rss_kib'] / 1024:.0f} MB |",
        f"| torchrun, {n} ranks | {ppl['many']['wiki']:.3f} | {ppl['many']['held_out']:.3f} | "
        f"wiki {delta('wiki')}, held-out {delta('held_out')} | "
        f"{result['many']['wall_s']:.1f} | {rank_rss} |",
        "",
    ]


def render(results: list[dict[str, Any]]) -> str:
    """The markdown section, markers included."""
    lines = [
        BEGIN,
        "## Calibration across processes (torchrun, gloo on CPU)",
        "",
        "The same `slimc quant` run in one process and on N torchrun ranks (each calibrating on "
        "every N-th sample, statistics reduced over the ranks). The one process uses every "
        "core (torch's default threads); torchrun gives each of its N ranks one thread. Both "
        "observers reduce exactly (extremes; histograms on one power-of-two grid, whose bins "
        "merge exactly), so the checkpoints are identical.",
        "",
    ]
    for result in results:
        lines += render_one(result)
    return "\n".join([*lines[:-1], END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: packaged)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--windows", type=int, default=40, help="wiki windows (protocol: 40)")
    parser.add_argument("--held-out-windows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--cache", type=Path, default=Path("out/bench_distributed.json"))
    parser.add_argument("--render-only", action="store_true", help="only rewrite the section")
    parser.add_argument("quant_args", nargs="*", help="slimc quant arguments (after --)")
    args = parser.parse_args(argv)
    if not args.quant_args:
        args.quant_args = ["--quant-type", "w8a8"]
    cache = load_cache(args.cache, args.out, BEGIN, END)
    if not args.render_only:
        with tempfile.TemporaryDirectory(prefix="slimc-bench-dist-") as tmp:
            result = measure(args, Path(tmp))
        command = "python -m slimc.tools.bench_distributed " + shlex.join(
            [*(["--model", args.model] if args.model else []), "--ranks", str(args.ranks), "--"]
            + args.quant_args
        )
        result.update(
            command=command,
            ranks_count=args.ranks,
            model=args.model or "packaged SmolLM2-135M-Instruct",
            held_out_windows=args.held_out_windows,
        )
        cache[command] = result
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        args.cache.write_text(json.dumps(cache, indent=1))
    write_section(args.out, render(list(cache.values())), BEGIN, END)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
