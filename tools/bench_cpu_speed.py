"""CPU speed of lowered quantized models and linears next to fp32 and bf16 eager; writes docs/benchmarks.md.

Run: python -m slimc.tools.bench_cpu_speed [--models llama smollm2] [--quick]
Each model configuration runs in its own process (its peak RSS is its own). Per-linear timings
compare the `lower-cpu` kernel ops with bf16 `F.linear` on the same inputs.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from slimc.tools.bench_linear_quant import machine, write_section

BEGIN, END = "<!-- bench_cpu_speed:begin -->", "<!-- bench_cpu_speed:end -->"
LINEAR_SHAPES = ((576, 1536), (1536, 576), (576, 576), (4096, 4096))  # (K in, N out)
LINEAR_M = (1, 16, 128, 512)
ERR_KEYS = (
    "logits_rel_err",
    "logits_rel_l2",
    "logits_rel_err_fp32",
    "reference_rel_err_fp32",
)
CONFIGS = {
    "fp32 eager": ("fp32", None),
    "bf16 eager": ("bf16", None),
    "W8A8 dynamic, lower-cpu": ("bf16", "w8a8-dynamic,lower-cpu"),
    "W8A8 dynamic, lower-cpu on torch._int_mm": (
        "bf16",
        "w8a8-dynamic,lower-cpu{int8-engine=int_mm}",
    ),
    "W8A8 dynamic + lm_head, lower-cpu": (
        "bf16",
        "linear-quant{scheme=w8a8-dynamic ignore=nothing},fuse-quantized-linear,lower-cpu",
    ),
    "QuaRot (online down_proj rotation) + W8A8 dynamic, lower-cpu": (
        "bf16",
        "quarot{online-inputs=down_proj},w8a8-dynamic,lower-cpu",
    ),
    "W4A16 g64, lower-cpu": ("bf16", "w4a16{group-size=64},lower-cpu"),
    "W4A16 g64 + lm_head, lower-cpu": (
        "bf16",
        "linear-quant{scheme=w4a16 group-size=64 ignore=nothing},fuse-quantized-linear,lower-cpu",
    ),
}


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median wall time of `fn` in milliseconds after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------- models


def build_model(name: str, quick: bool, dtype: torch.dtype) -> torch.nn.Module:
    """The Llama-shaped random model (seeded) or the packaged SmolLM2, in `dtype`."""
    if name == "smollm2":
        from slimc.data import load_model

        return load_model()[0].to(dtype).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=1 if quick else 8,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy in the peak memory
    try:
        return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def measure_model(name: str, config: str, quick: bool) -> dict[str, float]:
    """Prefill / decode timings, memory and logits error of one configuration (one process).

    Timings and memory come first (the model built directly in its dtype, compiled in place);
    the reference models for the logits error are built afterwards.
    """
    import slimc

    dtype_name, pipeline = CONFIGS[config]
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model = build_model(name, quick, dtype)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, 64 if quick else 512), generator=gen)
    head = prompt[:, :128]
    if pipeline is not None:
        model = slimc.compile(model, pipeline, inplace=True, progress=False)
    gc.collect()
    result: dict[str, float] = {"rss_mb": _current_rss_mb()}
    reps = 2 if quick else 3
    with torch.inference_mode():
        result["prefill_ms"] = median_ms(lambda: model(prompt, use_cache=False), reps)
        for batch in (1, 8):
            result[f"decode_b{batch}_tok_s"] = decode_tokens_per_s(model, batch, vocab, quick)
        got = model(head).logits.float()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if pipeline is not None:
        del model
        unlowered = pipeline.rsplit(",lower-cpu", 1)[0]
        refs = {}
        for ref_dtype in (torch.float32, dtype):
            ref = slimc.compile(build_model(name, quick, ref_dtype), unlowered, progress=False)
            with torch.inference_mode():
                refs[ref_dtype] = ref(head).logits.float()
            del ref
        result["logits_rel_err"] = _rel(got, refs[dtype])
        result["logits_rel_l2"] = _rel_l2(got, refs[dtype])
        result["logits_rel_err_fp32"] = _rel(got, refs[torch.float32])
        result["reference_rel_err_fp32"] = _rel(refs[dtype], refs[torch.float32])
    return result


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def _rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))


def decode_tokens_per_s(model: torch.nn.Module, batch: int, vocab: int, quick: bool) -> float:
    """Tokens per second of greedy decode steps after a 128-token prompt, KV cache on."""
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, vocab, (batch, 16 if quick else 128), generator=gen)
    steps = 4 if quick else 16
    out = model(prompt, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm-up steps (first calls compile the CPU kernels' helpers)
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return batch * steps / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- linears


def measure_linears(quick: bool) -> list[dict[str, object]]:
    """Median ms of bf16 F.linear and the lower-cpu kernel ops on random weights."""
    import slimc.kernels.cpu as cpu_kernels
    from slimc.ops.packing import pack_int4

    ops = torch.ops.slimc
    rows = []
    gen = torch.Generator().manual_seed(0)
    for k, n in LINEAR_SHAPES[:1] if quick else LINEAR_SHAPES:
        w = torch.randn(n, k, generator=gen) * 0.02
        w_bf16 = w.to(torch.bfloat16)
        q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        s8 = torch.rand(n, generator=gen) * 1e-3
        q4 = pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen))
        s4 = torch.rand(n, k // 64, generator=gen) * 1e-2
        z4 = torch.randint(-4, 4, (n, k // 64), dtype=torch.int8, generator=gen)
        packed, sz, group = cpu_kernels.prepare_int4(q4, s4, z4, 64, torch.bfloat16)
        for m in LINEAR_M[:2] if quick else LINEAR_M:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            reps = 5 if m * k * n < 1e9 else 3
            bf16 = median_ms(lambda: torch.nn.functional.linear(x, w_bf16), reps)  # noqa: B023
            int8 = {
                engine: median_ms(
                    lambda e=engine: ops.cpu_linear_int8_dynamic(x, q8, s8, None, -128, 127, e),  # noqa: B023
                    reps,
                )
                for engine in ("onednn", "int_mm")
            }
            int4 = median_ms(
                lambda: ops.cpu_linear_int4_weight(x, packed, sz, q4, group, None, 48),  # noqa: B023
                reps,
            )
            rows.append(
                {
                    "k": k,
                    "n": n,
                    "m": m,
                    "bf16": bf16,
                    "w8a8": int8["onednn"],
                    "w8a8_int_mm": int8["int_mm"],
                    "w4a16": int4,
                }
            )
    return rows


# --------------------------------------------------------------------------- report


def render(results: dict[str, object], command: str) -> str:
    lines = [
        BEGIN,
        "## CPU speed: lower-cpu kernels next to fp32 and bf16 eager",
        "",
        f"Command: `{command}`  ",
        f"Date: {results['date']}  ",
        f"Machine: {results['machine']}  ",
        "Prefill: one forward of 1 x 512 tokens (no cache), median of 3. Decode: tokens/s of 16 "
        "greedy steps with the KV cache after a 128-token prompt (batch 1 and 8), through the "
        "model's own forward. Quantized models run their non-linear parts in bf16; lm_head stays "
        'bf16 unless the row says otherwise. "RSS" is the process after building (and '
        'compiling) the model in its dtype, "peak RSS" its maximum through compilation and '
        "the timed runs; RSS includes memory the allocator kept from quantizing (the "
        "Llama-shaped W8A8 build has 595 MB of tensors and has measured 1180 to 2200 MB RSS "
        'in different runs of the same code). "logits err" is the max |difference| of the '
        "lowered model's logits from the same quantized model on the reference ops, relative "
        'to the largest logit, "logits L2 err" the norm of the difference relative to the '
        "reference's norm. Ratios are against bf16 eager from the same run.",
        "",
    ]
    for model, rows in results["models"].items():
        base = rows.get("bf16 eager", {})
        lines += [
            f"### {model}",
            "",
            "| config | prefill ms | x bf16 | decode b1 tok/s | x bf16 | decode b8 tok/s "
            "| x bf16 | RSS MB | peak RSS MB | logits err | logits L2 err | vs fp32 ref "
            "| bf16 ref vs fp32 ref |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for config, r in rows.items():
            pre = base.get("prefill_ms", float("nan")) / r["prefill_ms"]
            d1 = r["decode_b1_tok_s"] / base.get("decode_b1_tok_s", float("nan"))
            d8 = r["decode_b8_tok_s"] / base.get("decode_b8_tok_s", float("nan"))
            errs = [r.get(key) for key in ERR_KEYS]
            cells = " | ".join("" if e is None else f"{e:.2e}" for e in errs)
            lines.append(
                f"| {config} | {r['prefill_ms']:.0f} | {pre:.2f} | {r['decode_b1_tok_s']:.1f} "
                f"| {d1:.2f} | {r['decode_b8_tok_s']:.1f} | {d8:.2f} | {r['rss_mb']:.0f} | {r['peak_rss_mb']:.0f} "
                f"| {cells} |"
            )
        lines.append("")
    lines += [
        "### Per linear (median ms; x = speed-up over bf16 F.linear)",
        "",
        "| K x N | M | bf16 | W8A8 dynamic (`cpu.onednn`) | x | W8A8 dynamic (`cpu.int_mm`) "
        "| x | W4A16 g64 (`cpu.int4pack_mm`) | x |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["linears"]:
        cells = [
            f"{r[key]:.3f} | {r['bf16'] / r[key]:.2f}"
            for key in ("w8a8", "w8a8_int_mm", "w4a16")
            if key in r
        ]
        lines.append(f"| {r['k']} x {r['n']} | {r['m']} | {r['bf16']:.3f} | {' | '.join(cells)} |")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["llama", "smollm2"])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="1 layer, short prompts (smoke)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=Path("out/bench_cpu_speed.json"))
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:  # one configuration, in this process
        print(json.dumps(measure_model(args.one[0], args.one[1], args.quick)))
        return 0
    titles = {
        "llama": "Llama-shaped (hidden 2048, FFN 5632, 8 layers, 32/8 heads, vocab 32000, "
        "random weights)",
        "smollm2": "SmolLM2-135M-Instruct",
    }
    results: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "models": {},
    }
    for model in args.models:
        rows = {}
        for config in args.configs:
            cmd = [sys.executable, "-m", "slimc.tools.bench_cpu_speed", "--one", model, config]
            cmd += ["--quick"] if args.quick else []
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows[config] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{model:8s} {config:40s} {rows[config]}", flush=True)
        results["models"][titles.get(model, model)] = rows
    results["linears"] = measure_linears(args.quick)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    command = "python -m slimc.tools.bench_cpu_speed " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if not args.quick:
        write_section(args.out, render(results, command.strip()), BEGIN, END)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
