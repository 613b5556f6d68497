"""GPU benchmark of slimc's Triton kernel families against bf16 cuBLAS `F.linear`: a markdown table.

Run on a CUDA machine:
    python -m slimc.tools.bench_kernels_gpu [--families w4a16] [--shapes 4096x4096,...]
        [--m 1,16,64] [--output FILE] [--write-w4a16-table configs/h100.json]

Shapes are weight shapes NxK (out_features x in_features). Every time is the median of
`triton.testing.do_bench` (CUDA events, L2 flushed before each run) on fresh random inputs.
Each row also reports its relative error against an fp32 computation of the same quantized
model, so a fast but wrong kernel shows up.

Adding a kernel family: write `bench_<family>(case) -> list[Row]` and add it to `FAMILIES`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
DEFAULT_MS = (1, 16, 64, 256, 1024, 8192)


@dataclass(frozen=True)
class Case:
    """One benchmark point: a weight [n, k] and a bf16 activation [m, k] on the GPU."""

    n: int
    k: int
    m: int
    device_name: str


@dataclass(frozen=True)
class Row:
    """One measured kernel: time, bytes it must move (for the bandwidth column), error."""

    family: str
    kernel: str
    config: str
    us: float
    bytes_moved: int
    rel_err: float | None = None


BenchFn = Callable[[Case], list[Row]]


def time_us(fn: Callable[[], object]) -> float:
    """Median microseconds of fn() with the L2 flushed before each run."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def rel_err(out, ref) -> float:  # noqa: ANN001  (tensors; torch is imported lazily)
    """||out - ref|| / ||ref|| in fp32."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- baseline


def bench_cublas_bf16(case: Case) -> Row:
    """bf16 `F.linear` (cuBLAS): the denominator of every speedup."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(case.m, case.k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(case.n, case.k, device="cuda", dtype=torch.bfloat16)
    us = time_us(lambda: F.linear(x, w))
    return Row(
        "bf16", "cuBLAS F.linear", "", us, 2 * (case.n * case.k + case.m * (case.k + case.n))
    )


# --------------------------------------------------------------------------- families


def bench_w4a16(case: Case, group_size: int = 128) -> list[Row]:
    """W4A16 (int4 g128 asymmetric, bf16 activations): the selected kernel and each variant."""
    import torch
    import torch.nn.functional as F

    from slimc.kernels.w4a16 import dispatch as dsp
    from slimc.kernels.w4a16 import launcher
    from slimc.kernels.w4a16.tune import random_problem
    from slimc.ops.linear import dequantize_weight
    from slimc.ops.packing import unpack_int4

    n, k, m = case.n, case.k, case.m
    x, qw, scale, zp = random_problem(n, k, m, group_size, torch.bfloat16, "cuda")
    ref = F.linear(x.float(), dequantize_weight(unpack_int4(qw), scale, zp, group_size))
    p = launcher.prepare(x, qw, scale, zp, group_size, None)
    weight_bytes = qw.numel() + scale.numel() * 4 + zp.numel()
    io_bytes = 2 * m * (k + n)

    sel = dsp.select_explained(n, k, m, group_size, case.device_name)
    variants = [("selected: " + sel.kernel, sel.kernel, sel.config)]
    table = dsp.load_table(case.device_name)
    for kernel in dsp.KERNELS:
        if kernel == dsp.GEMV and m > 16:
            continue  # one program per row: not a candidate beyond decode sizes
        buckets = [b for b, e in table.rules.items() if e["kernel"] == kernel]
        if not buckets:
            continue
        near = min(buckets, key=lambda b: abs(b.bit_length() - dsp.bucket_m(m).bit_length()))
        rule = table.rules[near]["config"]  # the rule of the nearest M bucket using this kernel
        cfg = dsp.fit_config(kernel, rule, n, k, m, group_size, table.sms)
        if (kernel, cfg) != (sel.kernel, sel.config):
            variants.append((kernel, kernel, cfg))

    rows = []
    for label, kernel, cfg in variants:
        out = launcher.run(p, kernel, cfg)
        extra = 2 * n * k if kernel == dsp.DEQUANT_LINEAR else 0  # dense weight written + read
        rows.append(
            Row(
                "w4a16",
                label,
                " ".join(f"{key}={v}" for key, v in cfg.items()),
                time_us(lambda k_=kernel, c=cfg: launcher.run(p, k_, c)),
                weight_bytes + io_bytes + extra,
                rel_err(out, ref),
            )
        )
    return rows


def _fmt(cfg: dict) -> str:
    return " ".join(f"{key}={v}" for key, v in cfg.items())


def _gemm_variants(gk, case: Case) -> list[tuple[str, str, dict]]:  # noqa: ANN001
    """The selected 8-bit GEMM kernel, then the other kernel with its nearest table rule."""
    n, k, m = case.n, case.k, case.m
    sel = gk.select_explained(n, k, m, case.device_name)
    out = [("selected: " + sel.kernel, sel.kernel, sel.config)]
    table = gk.family.load_table(case.device_name)
    for kernel in (gk.gemm, gk.fused):
        buckets = [b for b, (kern, _) in table.rules.items() if kern == kernel]
        if kernel == sel.kernel or not buckets or (kernel == gk.fused and m > 256):
            continue  # the fused prologue repeats the quantization per N tile: small M only
        near = min(buckets, key=lambda b: abs(b.bit_length() - m.bit_length()))
        out.append((kernel, kernel, gk.fit_config(kernel, table.rules[near][1], n, k, m)))
    return out


def bench_w8a8(case: Case) -> list[Row]:
    """W8A8 int8 (per-token dynamic activations, quantization included) vs torch._int_mm."""
    import torch

    from slimc.kernels.w8a8 import launcher
    from slimc.kernels.w8a8.dispatch import KERNELS_W8A8

    n, k, m = case.n, case.k, case.m
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qw = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    ws = torch.rand(n, 1, device="cuda") * 0.01
    xq, xs = launcher.quantize_per_token(x, -128, 127)
    ref = (xq.double() @ qw.double().t()).float() * xs * ws.t()
    io = 2 * m * k + 2 * m * n
    rows = []
    for label, kernel, cfg in _gemm_variants(KERNELS_W8A8, case):
        run = lambda k_=kernel, c=cfg: launcher.linear_dynamic(x, qw, ws, None, -128, 127, k_, c)  # noqa: E731
        rows.append(
            Row("w8a8", label, _fmt(cfg), time_us(run), n * k + 4 * n + io, rel_err(run(), ref))
        )
    quant = lambda: launcher.quantize_per_token(x, -128, 127)  # noqa: E731
    rows.append(Row("w8a8", "per-token quant only", "", time_us(quant), 3 * m * k + 4 * m))
    if m > 16 and k % 8 == 0 and n % 8 == 0:  # torch._int_mm rejects M <= 16
        qwt = qw.t()
        int_mm = lambda: torch._int_mm(xq, qwt)  # noqa: E731
        rows.append(
            Row("w8a8", "torch._int_mm (int32 out)", "", time_us(int_mm), n * k + m * k + 4 * m * n)
        )

        def int_mm_full():
            q, s = launcher.quantize_per_token(x, -128, 127)
            return (torch._int_mm(q, qwt).float() * s * ws.t()).to(torch.bfloat16)

        rows.append(Row("w8a8", "quant + torch._int_mm + scales", "", time_us(int_mm_full),
                        n * k + io, rel_err(int_mm_full(), ref)))  # fmt: skip
    return rows


def bench_fp8(case: Case) -> list[Row]:
    """FP8 e4m3 rowwise (per-token activation quantization included) vs torch._scaled_mm."""
    import torch

    from slimc.kernels.fp8.dispatch import KERNELS_FP8
    from slimc.kernels.w8a8 import launcher
    from slimc.ops.fp8 import E4M3_MAX, fp8_matmul, quantize_weight_fp8_rowwise

    if torch.cuda.get_device_capability() < (8, 9):
        return []
    n, k, m = case.n, case.k, case.m
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qw, ws = quantize_weight_fp8_rowwise(torch.randn(n, k, device="cuda"))
    xq, xs = quantize_weight_fp8_rowwise(x)  # the same rowwise math, in plain torch
    ref = fp8_matmul(xq, qw) * xs * ws.t()
    io = 2 * m * k + 2 * m * n
    rows = []
    for label, kernel, cfg in _gemm_variants(KERNELS_FP8, case):
        run = lambda k_=kernel, c=cfg: launcher.linear_dynamic(  # noqa: E731
            x, qw, ws, None, -E4M3_MAX, E4M3_MAX, k_, c, None, KERNELS_FP8
        )
        rows.append(
            Row("fp8", label, _fmt(cfg), time_us(run), n * k + 4 * n + io, rel_err(run(), ref))
        )
    qwt, wst = qw.t(), ws.t().contiguous()

    def scaled_mm_full():
        q, s = launcher.quantize_per_token(x, -E4M3_MAX, E4M3_MAX, fp8=True)
        return torch._scaled_mm(q, qwt, scale_a=s, scale_b=wst, out_dtype=torch.bfloat16)

    scaled = lambda: torch._scaled_mm(xq, qwt, scale_a=xs, scale_b=wst, out_dtype=torch.bfloat16)  # noqa: E731
    rows.append(Row("fp8", "quant + torch._scaled_mm", "", time_us(scaled_mm_full),
                    n * k + io, rel_err(scaled_mm_full(), ref)))  # fmt: skip
    rows.append(Row("fp8", "torch._scaled_mm (pre-quantized x)", "", time_us(scaled),
                    n * k + m * k + 2 * m * n, rel_err(scaled(), ref)))  # fmt: skip
    return rows


def bench_hadamard_quant(case: Case) -> list[Row]:
    """Fused Hadamard (width K) + per-token int8 quantization vs the quantization alone."""
    import torch

    from slimc.kernels.hadamard_quant import select
    from slimc.kernels.hadamard_quant.launcher import hadamard_quantize
    from slimc.kernels.w8a8 import launcher
    from slimc.rotate.hadamard import random_signs

    k, m = case.k, case.m
    try:
        kernel, cfg = select(k, m, case.device_name)
    except ValueError:
        return []  # no Hadamard construction of order K
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    signs = random_signs(k).to("cuda")
    y = torch.ops.slimc.hadamard(x, signs)  # float64 reference rotation, in x's dtype
    ys = torch.clamp(
        y.float().abs().amax(-1, keepdim=True) / 127, min=torch.finfo(torch.float32).eps
    )
    ref = torch.clamp(torch.round(y.float() / ys), -128, 127) * ys
    fused = lambda: hadamard_quantize(x, signs, -128, 127, kernel, cfg)  # noqa: E731
    q, s = fused()
    bytes_q = 3 * m * k + 4 * m
    quant = lambda: launcher.quantize_per_token(x, -128, 127)  # noqa: E731
    return [
        Row("hadamard_quant", "selected: " + kernel, _fmt(cfg), time_us(fused), bytes_q,
            rel_err(q.float() * s, ref)),
        Row("hadamard_quant", "per-token quant only", "", time_us(quant), bytes_q),
    ]  # fmt: skip


FAMILIES: dict[str, BenchFn] = {
    "w4a16": bench_w4a16,
    "w8a8": bench_w8a8,
    "fp8": bench_fp8,
    "hadamard_quant": bench_hadamard_quant,
}
"""Kernel family -> bench function (a new family adds its own here)."""


# --------------------------------------------------------------------------- report


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(s.isdigit() for s in parts):
            raise SystemExit(
                f"bench_kernels_gpu: bad shape {item!r}; expected NxK, e.g. 4096x14336"
            )
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"bench_kernels_gpu: bad {what} list {text!r}") from None


def run(families: list[str], shapes: list[tuple[int, int]], ms: list[int]) -> str:
    """Benchmark and return the markdown report."""
    import torch
    import triton

    name = torch.cuda.get_device_name()
    lines = [
        f"## Kernel benchmark on {name}",
        "",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}  ",
        "Method: triton.testing.do_bench median (L2 flushed), random inputs, bf16 activations; "
        "speedup = bf16 cuBLAS time / kernel time; TB/s = bytes the kernel must move / time; "
        "rel err = ||out - ref|| / ||ref|| against fp32 on the same quantized weights.",
        "",
        "| N | K | M | family | kernel | config | time (us) | x vs bf16 cuBLAS | TB/s | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, k in shapes:
        for m in ms:
            case = Case(n, k, m, name)
            base = bench_cublas_bf16(case)
            rows = [base]
            for family in families:
                rows += FAMILIES[family](case)
            for r in rows:
                err = "" if r.rel_err is None else f"{r.rel_err:.1e}"
                lines.append(
                    f"| {n} | {k} | {m} | {r.family} | {r.kernel} | {r.config} | {r.us:.1f} | "
                    f"{base.us / r.us:.2f} | {r.bytes_moved / r.us / 1e6:.2f} | {err} |"
                )
            torch.cuda.empty_cache()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_kernels_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list of families")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in DEFAULT_SHAPES))
    parser.add_argument("--m", default=",".join(map(str, DEFAULT_MS)), help="batch sizes M")
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    parser.add_argument(
        "--write-w4a16-table",
        type=Path,
        metavar="JSON",
        help="tune the W4A16 kernels on these shapes and M values and write a config table",
    )
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(
            f"bench_kernels_gpu: unknown family {unknown}; have {sorted(FAMILIES)}", file=sys.stderr
        )
        return 2
    shapes, ms = _parse_shapes(args.shapes), _parse_ints(args.m, "M")
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"bench_kernels_gpu: needs torch and triton ({exc})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "bench_kernels_gpu: needs a CUDA GPU (torch.cuda.is_available() is False); "
            "nothing was measured",
            file=sys.stderr,
        )
        return 2
    if args.write_w4a16_table:
        from slimc.kernels.w4a16.dispatch import reload_tables
        from slimc.kernels.w4a16.tune import tune_table

        table = tune_table(shapes, ms)
        args.write_w4a16_table.write_text(json.dumps(table, indent=1) + "\n")
        reload_tables()  # takes effect below if it was written into the package's configs/
        print(f"wrote {args.write_w4a16_table}", file=sys.stderr)
    report = run(families, shapes, ms)
    print(report, end="")
    if args.output:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
