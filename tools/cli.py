"""slimc: quantize a model in one command (slimc quant) and measure perplexity (slimc eval)."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

from slimc.tools._cli_common import run_guarded, setup_logging

from slimc.quant.scheme import SCHEMES, make_scheme
from slimc.registry import ANTI_OUTLIER, ROTATIONS, WEIGHT_METHODS

FORMATS = ("auto", "compressed-tensors", "ascend-v1", "pt2")


def smoothing_options(args: argparse.Namespace) -> list[str]:
    """Options of the `--anti-outlier` pass that follow from the quantization flags.

    Passes that search against a quantizer (flex-smooth-quant, awq, flex-awq-ssz) get the
    activation quantizer and weight format the chosen `--quant-type` will use.
    """
    scheme = make_scheme(args.quant_type)  # bits and default symmetry; group size checked later
    weight, act = scheme.weight, scheme.activation
    symmetric = args.symmetric or weight.symmetric
    if args.anti_outlier == "flex-smooth-quant":
        return [
            "act-quant=" + ("per-tensor" if act is not None and not act.dynamic else "per-token")
        ]
    if args.anti_outlier == "awq":
        opts = [f"bits={weight.bits}", f"symmetric={str(symmetric).lower()}"]
        return opts + ([f"group-size={args.group_size}"] if args.group_size else [])
    if args.anti_outlier == "flex-awq-ssz":
        opts = [f"weight-bits={weight.bits}", f"symmetric={str(symmetric).lower()}"]
        static = act is not None and not act.dynamic
        opts.append(
            "act-quant=" + ("none" if act is None else "per-tensor" if static else "per-token")
        )
        return opts + ([f"group-size={args.group_size}"] if args.group_size else [])
    return []


def rotation_options(args: argparse.Namespace) -> list[str]:
    """Options of the `--rotation` pass that follow from the quantization flags.

    adapt-rotation learns its rotation against the per-token quantizer of the activations the
    scheme quantizes (int4 for w4a4, int8 otherwise; the weight width for weight-only schemes).
    """
    if args.rotation != "adapt-rotation":
        return []
    scheme = make_scheme(args.quant_type)
    bits = (scheme.activation or scheme.weight).bits
    return [f"quant-bits={bits}"]


def build_pipeline(args: argparse.Namespace) -> str:
    """The pipeline string `slimc quant` runs for its flags.

    Optional smoothing, then the scheme: the named plain pipeline for `--weight-method rtn`, or
    the weight method's quantizer pass (`gptq{scheme=...}`) followed by fusion.
    """
    prefix = ""
    if args.rotation:
        opts = rotation_options(args)
        prefix = args.rotation + ("{" + " ".join(opts) + "}" if opts else "") + ","
    if args.anti_outlier:
        opts = smoothing_options(args)
        prefix += args.anti_outlier + ("{" + " ".join(opts) + "}" if opts else "") + ","
    opts = []
    if args.group_size is not None:
        opts.append(f"group-size={args.group_size}")
    if args.symmetric:
        opts.append("symmetric=true")
    if args.observer != "histogram":
        opts.append(f"observer={args.observer}")
    if args.ignore is not None:
        opts.append("ignore=" + ",".join(f'"{g}"' for g in args.ignore))
    method = WEIGHT_METHODS[args.weight_method]
    if method == "linear-quant":
        return prefix + args.quant_type + ("{" + " ".join(opts) + "}" if opts else "")
    opts.insert(0, f"scheme={args.quant_type}")
    return prefix + method + "{" + " ".join(opts) + "},fuse-quantized-linear"


def choose_format(model: Any, requested: str) -> str:
    """`--format auto`: compressed-tensors when it can hold the model, else slimc's pt2."""
    if requested != "auto":
        return requested
    from slimc.errors import UserError
    from slimc.export.compressed_tensors import check_expressible

    try:
        check_expressible(model)
    except UserError as exc:
        reason = str(exc).split(";")[0]
        print(f"saving as pt2: {reason}", file=sys.stderr)
        return "pt2"
    return "compressed-tensors"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_quant(args: argparse.Namespace) -> int:
    import slimc
    from slimc.data import calibration_samples, eval_token_ids, load_model
    from slimc.errors import UserError
    from slimc.evaluate import perplexity
    from slimc.export import save
    from slimc.export.atomic import check_target
    from slimc.pass_manager import PassManager

    pipeline = build_pipeline(args)
    pm = PassManager.parse(pipeline)  # checked before anything is loaded
    if args.save is None and not args.eval:
        raise UserError("nothing to do: give --save DIR and/or --eval N")
    if args.save is not None:
        check_target(args.save, overwrite=args.overwrite)  # fail before the long work, not after
    model, tokenizer = load_model(args.model)
    print(f"pipeline: {pm.pipeline_spec(include_defaults=True)}", file=sys.stderr)
    rows: list[tuple[str, ...]] = [("model", "PPL", "delta", "quant time s", "peak RSS MB")]
    ids = eval_token_ids(tokenizer) if args.eval else None
    fp32_ppl = None
    if ids is not None:
        fp32 = perplexity(model, ids, windows=args.eval)
        fp32_ppl = fp32.ppl
        rows.append(("fp32", f"{fp32.ppl:.3f}", "", "", f"{_peak_rss_mb():.0f}"))
    calib = None
    if pm.needs_calibration:
        calib = calibration_samples(tokenizer, n=args.calib_samples)
    start = time.perf_counter()
    quantized = slimc.compile(model, pm.steps, calib=calib)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    qppl = ""
    delta = ""
    if ids is not None:
        q = perplexity(quantized, ids, windows=args.eval)
        qppl, delta = f"{q.ppl:.3f}", f"{100 * (q.ppl / fp32_ppl - 1):+.2f}%"
    label = " + ".join(
        [args.quant_type]
        + ([args.rotation] if args.rotation else [])
        + ([args.anti_outlier] if args.anti_outlier else [])
        + ([args.weight_method] if args.weight_method != "rtn" else [])
    )
    rows.append((label, qppl, delta, f"{seconds:.1f}", f"{peak:.0f}"))
    if args.save is not None:
        fmt = choose_format(quantized, args.format)
        save(quantized, args.save, format=fmt, tokenizer=tokenizer, overwrite=args.overwrite)
        print(f"saved {fmt} model to {args.save}", file=sys.stderr)
    if ids is not None:
        print(f"\nPPL on {args.eval} windows of 512 tokens (wiki):")
    print(_table(rows))
    return 0


def _load_for_eval(path: str | None) -> tuple[Any, Any]:
    """An HF / compressed-tensors directory via transformers, or a slimc pt2 directory."""
    from slimc.data import load_model

    if path is not None and (Path(path) / "model.pt2").is_file():
        from transformers import AutoTokenizer

        from slimc.export import load

        return load(path), AutoTokenizer.from_pretrained(path)
    return load_model(path)


def cmd_eval(args: argparse.Namespace) -> int:
    from slimc.data import eval_token_ids
    from slimc.evaluate import perplexity

    model, tokenizer = _load_for_eval(args.model)
    ids = eval_token_ids(tokenizer, args.text)
    bos = tokenizer.bos_token_id if args.bos_per_window else None
    if args.bos_per_window and bos is None:
        from slimc.errors import UserError

        raise UserError(f"--bos-per-window: the tokenizer of {args.model} has no BOS token")
    result = perplexity(model, ids, windows=args.windows, bos_token_id=bos)
    print(
        f"PPL {result.ppl:.3f}  (nll {result.nll:.4f}, {result.n_tokens} tokens, "
        f"{result.windows} windows, {result.seconds:.1f} s)"
    )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimc", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quant",
        help="quantize a model with a plain scheme and save it",
        description="Quantize a Hugging Face causal LM (default: the packaged "
        "SmolLM2-135M-Instruct) and save it.",
    )
    q.add_argument("--model", default=None, help="HF model directory (default: packaged SmolLM2)")
    q.add_argument(
        "--quant-type",
        required=True,
        choices=SCHEMES,
        help="w8a8 = static per-tensor int8 activations; w8a8-dynamic = per-token; "
        "w4a16 defaults to asymmetric with an integer zero point",
    )
    q.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="weight group size along K (default: per output channel)",
    )
    q.add_argument("--symmetric", action="store_true", help="symmetric weights (w4a16/w8a16)")
    q.add_argument(
        "--anti-outlier",
        choices=ANTI_OUTLIER,
        default=None,
        help="outlier suppression pass run before quantizing (default: none); searching "
        "passes are set up for the chosen --quant-type",
    )
    q.add_argument(
        "--rotation",
        choices=ROTATIONS,
        default=None,
        help="rotate the residual stream first (exact): quarot = seeded random Hadamard, "
        "adapt-rotation = Hadamard refined on calibration data for the scheme's activation "
        "quantizer (default: none)",
    )
    q.add_argument(
        "--weight-method",
        choices=tuple(WEIGHT_METHODS),
        default="rtn",
        help="how weights are rounded: rtn (MinMax round-to-nearest, default), gptq (Hessian "
        "error compensation on calibration data), ssz (data-free least-squares range refit), "
        "autoround (rounding offsets learned per decoder layer with SignSGD; slowest)",
    )
    q.add_argument(
        "--observer",
        choices=("minmax", "histogram"),
        default="histogram",
        help="static activation range observer for w8a8 (default histogram: 2048-bin L2 clip "
        "search; minmax: the full observed range)",
    )
    q.add_argument(
        "--ignore",
        nargs="*",
        default=None,
        metavar="GLOB",
        help="module-path globs left in float (default: lm_head)",
    )
    q.add_argument(
        "--calib-samples",
        type=int,
        default=128,
        help="calibration documents for passes that need data: static activations, "
        "smoothing, gptq (default 128)",
    )
    q.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="output format: auto (default) = compressed-tensors, loadable by transformers, "
        "when it can express the model, else pt2 (read by slimc eval and slimc.load); "
        "ascend-v1 = msModelSlim's AscendV1 for MindIE / vLLM-Ascend",
    )
    q.add_argument("--save", type=Path, default=None, metavar="DIR", help="output directory")
    q.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --save directory"
    )
    q.add_argument(
        "--eval",
        type=int,
        default=0,
        metavar="N",
        help="also measure fp32 and quantized PPL on N windows (protocol of data.md)",
    )
    q.set_defaults(func=cmd_quant)

    e = sub.add_parser("eval", help="perplexity of a model on wiki text or a text file")
    e.add_argument("--model", default=None, help="model directory (HF, compressed-tensors or pt2)")
    e.add_argument("--text", default="wiki", help="'wiki' (default) or a UTF-8 text file")
    e.add_argument("--windows", type=int, default=40, help="number of 512-token windows")
    e.add_argument(
        "--bos-per-window",
        action="store_true",
        help="prepend BOS to every window (for models trained with BOS)",
    )
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_guarded("slimc", lambda: args.func(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
