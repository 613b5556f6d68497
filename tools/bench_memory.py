"""Peak memory and wall time of one `slimc quant` run on a model directory; rows go to docs/benchmarks.md.

Run: python -m slimc.tools.bench_memory --model DIR --preset w8a8-dynamic [--cap-fraction 0.4]
     python -m slimc.tools.bench_memory --model DIR -- --quant-type w4a16 --group-size 32

The command runs as a subprocess under `/usr/bin/time -v` (its peak RSS, wall time and exit
status), optionally inside a memory cap of a fraction of the checkpoint's safetensors bytes (a
child cgroup, v2 else v1, else a systemd scope; refused when none can be made). Each run is kept
in a JSON cache (`--cache`) and the section "Engine: memory and time at model sizes" is rendered
from it between its markers. `--tool-check` marks a row as a check of this tool, not a result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slimc.errors import UserError
from slimc.tools._anon_sampler import AnonSampler
from slimc.tools._cli_common import run_guarded, setup_logging
from slimc.tools._memory_cap import require_memory_cap
from slimc.tools.bench_linear_quant import load_cache, write_section

BEGIN = "<!-- bench_memory:begin -->"
END = "<!-- bench_memory:end -->"
TITLE = "Engine: memory and time at model sizes"
PRESETS: dict[str, list[str]] = {
    "w8a8-dynamic": ["--quant-type", "w8a8-dynamic"],
    "w4a16-gptq": [
        "--quant-type",
        "w4a16",
        "--group-size",
        "64",
        "--weight-method",
        "gptq",
        "--calib-samples",
        "16",
    ],
    "w8a8": ["--quant-type", "w8a8"],
}
"""The issue's three schemes: `slimc quant` arguments after --model and --save."""
TIME = "/usr/bin/time"
Row = dict[str, Any]


def checkpoint_bytes(model: Path) -> int:
    """Bytes of the model's safetensors files (the size the memory cap is a fraction of)."""
    files = sorted(model.glob("*.safetensors"))
    if not files:
        raise UserError(f"--model {model}: no *.safetensors files")
    return sum(f.stat().st_size for f in files)


def describe_model(model: Path) -> str:
    """`Llama h2560 ffn6912 L24 v49152 bf16`-style name from config.json, else the directory name."""
    try:
        c = json.loads((model / "config.json").read_text())
        arch = c.get("model_type", "model").capitalize()
        dtype = str(c.get("dtype") or c.get("torch_dtype") or "").replace("bfloat16", "bf16")
        experts = c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts")
        moe = f" E{experts} top{c.get('num_experts_per_tok')}" if experts else ""
        return (
            f"{arch} h{c['hidden_size']} ffn{c['intermediate_size']} L{c['num_hidden_layers']}"
            f"{moe} v{c['vocab_size']} {dtype}".strip()
        )
    except (OSError, KeyError, ValueError):
        return model.name


def cpu_model() -> str:
    """The CPU's model name from lscpu and the number of CPUs."""
    name = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def idle_note(before: float, after: float) -> str:
    """Whether the machine was idle: 1-minute load average before the run and right after it."""
    cpus = os.cpu_count() or 1
    state = "idle" if before < 0.5 else "not idle"
    return f"{state} (load average {before:.2f} before, {after:.2f} after, {cpus} CPUs)"


def parse_time_v(text: str) -> dict[str, Any]:
    """Peak RSS (KiB), wall seconds and exit status from GNU time's `-v` report."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key == "Maximum resident set size (kbytes)":
            out["peak_rss_kib"] = int(value)
        elif key.startswith("Elapsed (wall clock) time"):
            parts = [float(p) for p in value.split(":")]
            out["wall_s"] = sum(p * 60**i for i, p in enumerate(reversed(parts)))
        elif key == "Exit status":
            out["exit_status"] = int(value)
        elif line.strip().startswith("Command terminated by signal"):
            out["signal"] = int(line.split()[-1])
    return out


def parse_stages(stdout: str) -> dict[str, float]:
    """The `time per stage:` line of `slimc quant`'s summary, if it printed one."""
    for line in stdout.splitlines():
        if line.startswith("time per stage: "):
            pairs = re.findall(r"(\S+) (\d+(?:\.\d+)?) s", line.removeprefix("time per stage: "))
            return {name: float(s) for name, s in pairs}
    return {}


def quant_arguments(args: argparse.Namespace) -> list[str]:
    """`slimc quant` arguments: the preset's, then those after `--` (a leading `quant` dropped)."""
    extra = list(args.quant_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if extra[:1] == ["quant"]:
        extra = extra[1:]
    if args.preset is None and not extra:
        raise UserError("give --preset NAME or the slimc quant arguments after --")
    for owned in ("--model", "--save"):
        if owned in extra:
            raise UserError(f"{owned} after --: bench_memory sets it (use its own --model/--save)")
    return [*PRESETS.get(args.preset, []), *extra]


def run(args: argparse.Namespace) -> Row:
    """Run `slimc quant` once under /usr/bin/time -v (and the cap); the measured row."""
    if not Path(TIME).is_file():
        raise UserError(f"{TIME} is missing: install GNU time (apt-get install time)")
    model = Path(args.model).expanduser().resolve()
    size = checkpoint_bytes(model)
    quant_args = quant_arguments(args)
    cap = None
    if args.cap_fraction is not None:
        if args.cap_fraction <= 0:
            raise UserError(f"--cap-fraction {args.cap_fraction} must be positive")
        cap = require_memory_cap(int(size * args.cap_fraction))
    scratch = Path(tempfile.mkdtemp(prefix="bench_memory-"))
    save = Path(args.save).expanduser() if args.save else scratch / "quantized"
    quant = [sys.executable, "-m", "slimc.tools.cli", "quant", "--model", str(model)]
    quant += ["--save", str(save), *(["--overwrite"] if args.save else []), *quant_args]
    report = scratch / "time.txt"
    cmd = [*(cap.prefix() if cap else []), TIME, "-v", "-o", str(report), *quant]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    before = load_average()
    try:
        if cap is not None:
            cap.make(f"slimc-bench-{os.getpid()}")
        print("running: " + " ".join(cmd), file=sys.stderr, flush=True)
        with (scratch / "stdout.txt").open("w") as out, (scratch / "stderr.txt").open("w") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=env, preexec_fn=cap.enter() if cap else None
            )
            with AnonSampler(proc.pid) as sampler:
                proc.wait()
            wall = time.perf_counter() - start
        usage = cap.usage() if cap else {}
        stdout = (scratch / "stdout.txt").read_text()
        stderr = (scratch / "stderr.txt").read_text()
        measured = parse_time_v(report.read_text()) if report.exists() else {}
        saved = sum(f.stat().st_size for f in save.glob("*") if f.is_file()) if save.exists() else 0
    finally:
        if cap is not None:
            cap.remove()
        if args.keep:
            print(f"logs and time report kept in {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        print(f"slimc quant exited with {proc.returncode}:\n{tail}", file=sys.stderr)
    shown = ["slimc", "quant", "--model", args.model_label or str(args.model), *quant_args]
    return {
        "model": describe_model(model),
        "scheme": _scheme_label(args, quant_args),
        "command": " ".join(shown),
        "bench_command": args.invocation,
        "model_source": args.model_source,
        "threads": args.threads,
        "checkpoint_bytes": size,
        "saved_bytes": saved,
        "cap_fraction": args.cap_fraction,
        "cap": cap.describe() if cap else None,
        "peak_rss_kib": measured.get("peak_rss_kib"),
        "peak_anon_kib": sampler.peak_kib,
        "wall_s": measured.get("wall_s", wall),
        "exit_status": measured.get("exit_status", proc.returncode),
        "signal": measured.get("signal"),
        "stages": parse_stages(stdout),
        **usage,
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "idle": idle_note(before, load_average()),
        "tool_check": args.tool_check,
    }


def code(text: str) -> str:
    """`text` as a markdown code span, fenced with two backticks when it holds one."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _scheme_label(args: argparse.Namespace, quant_args: list[str]) -> str:
    """The preset's name plus any arguments given after it (so two runs differ in their key)."""
    extra = quant_args[len(PRESETS.get(args.preset, [])) :] if args.preset else quant_args
    return " ".join([args.preset, *extra] if args.preset else extra)


def _row_key(row: Row) -> str:
    return f"{row['model']}|{row['scheme']}|{row['cap_fraction']}|{row['tool_check']}"


def render(rows: list[Row]) -> str:
    """The markdown section, markers included."""
    lines = [
        BEGIN,
        f"## {TITLE}",
        "",
        "Each row is one `slimc quant` process run by `python -m slimc.tools.bench_memory` under "
        "`/usr/bin/time -v`: peak RSS of the whole process, wall time, exit status; stage times "
        "come from the command's own summary. Peak anon is the largest anonymous resident "
        "memory (RssAnon, sampled every 50 ms): RSS less the memory-mapped checkpoint and work "
        "files, which the kernel can drop and read again, so it is the part a memory cap "
        "cannot reclaim. A cap is a cgroup memory limit of a fraction of "
        "the checkpoint's safetensors bytes (page cache counts but is reclaimable). Rows marked "
        "*tool check* prove the tool works on a small model; they are not results.",
        "",
        "| model | checkpoint MB | scheme | cap | exit | peak RSS MB | peak RSS / checkpoint "
        "| peak anon MB | peak anon / checkpoint | wall s | stages s | saved MB | date | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size_mb = r["checkpoint_bytes"] / 2**20
        rss_mb = r["peak_rss_kib"] / 1024 if r.get("peak_rss_kib") else None
        ratio = f"{rss_mb / size_mb:.2f}x" if rss_mb else ""
        anon_mb = r["peak_anon_kib"] / 1024 if r.get("peak_anon_kib") else None
        anon = f"{anon_mb:.0f} | {anon_mb / size_mb:.2f}x" if anon_mb else "? | "
        exit_text = f"signal {r['signal']}" if r.get("signal") else str(r["exit_status"])
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.get("stages", {}).items())
        threads = f", OMP_NUM_THREADS={r['threads']}" if r.get("threads") else ""
        model = r["model"] + (" (*tool check*, not a result)" if r.get("tool_check") else "")
        lines.append(
            f"| {model} | {size_mb:.0f} | {r['scheme']} | {r['cap'] or 'none'} | {exit_text} "
            f"| {f'{rss_mb:.0f}' if rss_mb else '?'} | {ratio} | {anon} | {r['wall_s']:.1f} "
            f"| {stages} "
            f"| {r['saved_bytes'] / 2**20:.0f} | {r['date']} | {r['cpu']}{threads}; {r['idle']} |"
        )
    lines += [
        "",
        "Commands (the `slimc quant` run, the benchmark command that ran it, the model):",
        "",
    ]
    for r in rows:
        source = f"; model: {code(r['model_source'])}" if r.get("model_source") else ""
        lines.append(f"* {code(r['command'])} ({code(r['bench_command'])}{source})")
    return "\n".join([*lines, END])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory (safetensors)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None, help="scheme to run")
    parser.add_argument(
        "--cap-fraction",
        type=float,
        default=None,
        help="run inside a memory cap of this fraction of the checkpoint's safetensors bytes",
    )
    parser.add_argument("--save", default=None, help="keep the quantized checkpoint here")
    parser.add_argument("--keep", action="store_true", help="keep the run's logs and time report")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the run")
    parser.add_argument("--model-label", default=None, help="how the model path is shown")
    parser.add_argument(
        "--model-source", default=None, help="how the model was made (shown with the command)"
    )
    parser.add_argument("--tool-check", action="store_true", help="mark the row as a tool check")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--cache", type=Path, default=Path("out/bench_memory.json"))
    parser.add_argument("--render-only", action="store_true", help="only rewrite the section")
    parser.add_argument("quant_args", nargs=argparse.REMAINDER, help="-- slimc quant arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging(False)

    args.invocation = "python -m slimc.tools.bench_memory " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )

    def body() -> int:
        cache: dict[str, Row] = load_cache(args.cache, args.out, BEGIN, END)
        status = 0
        if not args.render_only:
            row = run(args)
            status = 0 if row["exit_status"] == 0 else 1
            cache[_row_key(row)] = row
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            args.cache.write_text(json.dumps(cache, indent=1) + "\n")
            rss = row["peak_rss_kib"] or 0
            print(
                f"{row['scheme']}: exit {row['exit_status']}, peak RSS {rss / 1024:.0f} MB "
                f"({rss * 1024 / row['checkpoint_bytes']:.2f}x the checkpoint), "
                f"{row['wall_s']:.1f} s",
                flush=True,
            )
        write_section(args.out, render(list(cache.values())), BEGIN, END)
        print(f"wrote {args.out}", file=sys.stderr)
        return status

    return run_guarded("bench_memory", body, False)


if __name__ == "__main__":
    sys.exit(main())
