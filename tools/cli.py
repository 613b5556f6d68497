"""slimc: quantize a model in one command (slimc quant) and measure perplexity (slimc eval)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from slimc.heap import return_freed_memory_to_os
from slimc.pipeline_spec import OptionValue, PassSpec, format_pipeline
from slimc.quant.scheme import SCHEMES, QuantTarget
from slimc.registry import passes_with_role
from slimc.tools._cli_args import (
    add_calibration_arguments,
    calibration_from_args,
    check_ignore_patterns,
    group_size,
    ignore_patterns,
    int_at_least,
    open_work_dir,
)
from slimc.tools._cli_common import run_guarded, setup_logging
from slimc.tools._cli_report import StageClock, peak_rss_mb, table

FORMATS = ("auto", "compressed-tensors", "ascend-v1", "pt2")


def quant_target(args: argparse.Namespace) -> QuantTarget:
    """The scheme the flags quantize to, for the passes that set themselves up for it."""
    return QuantTarget(args.quant_type, args.group_size, args.symmetric)


def role_choice(args: argparse.Namespace, role: str) -> str | None:
    """The choice of a role's flag (`--anti-outlier` for role anti-outlier), None if not given."""
    return getattr(args, role.replace("-", "_"))


def role_spec(role: str, args: argparse.Namespace, **extra: OptionValue) -> PassSpec:
    """The pass a role's flag chose, with the options it takes for the flags' scheme."""
    cls = passes_with_role(role)[role_choice(args, role)]
    return PassSpec(cls.name, {**cls.for_scheme(quant_target(args)), **extra})


def build_pipeline(args: argparse.Namespace) -> str:
    """The pipeline string `slimc quant` runs for its flags.

    Optional rotation and smoothing, each set up for the scheme by its pass; then the weight
    method's quantizer pass (`gptq{scheme=...}`) followed by fusion.
    """
    specs = [role_spec(r, args) for r in ("rotation", "anti-outlier") if role_choice(args, r)]
    extra: dict[str, OptionValue] = {}
    if args.observer != "histogram":
        extra["observer"] = (args.observer,)
    if args.calibrate_all_experts:
        extra["calibrate-all-experts"] = ("true",)
    ignore = ignore_patterns(args)
    if ignore is not None:
        extra["ignore"] = tuple(ignore) or ("",)
    specs += [role_spec("weight-method", args, **extra), PassSpec("fuse-quantized-linear")]
    return format_pipeline(specs)


def choose_format(model: Any, requested: str) -> str:
    """`--format auto`: compressed-tensors when it can hold the model and transformers can load
    it back, else slimc's pt2 (the reason is printed)."""
    if requested != "auto":
        return requested
    from slimc.export import auto_format

    chosen, reason = auto_format(model)
    if reason is not None:
        print(f"saving as pt2: {reason}", file=sys.stderr)
    return chosen


def cmd_quant(args: argparse.Namespace) -> int:
    from slimc import distributed
    from slimc.errors import UserError
    from slimc.pass_manager import PassManager

    # every argument is checked before the model loads: nothing long runs on a bad input
    pipeline = build_pipeline(args)
    pm = PassManager.parse(pipeline)
    if args.save is None and not args.eval:
        raise UserError("nothing to do: give --save DIR and/or --eval N")
    if distributed.init_from_environment(args.dist_timeout):  # started by torchrun
        try:
            return _quant_on_ranks(args, pm)
        finally:
            distributed.shutdown()
    return _quant(args, pm)


def _quant(args: argparse.Namespace, pm: Any, work_suffix: str = "", save_here: bool = True) -> int:
    """Load, evaluate, quantize and save as the flags say (`save_here=False`: a rank other
    than 0 of a distributed run, which calibrates its share and writes no checkpoint)."""
    import torch

    import slimc
    from slimc.data import eval_token_ids, load_causal_lm, model_directory
    from slimc.evaluate import count_windows, perplexity
    from slimc.export import save
    from slimc.export.atomic import check_target
    from slimc.model_dir import check_float_checkpoint, load_tokenizer
    from slimc.work_dir import failure_keeps_records

    if args.save is not None and save_here:
        inputs = [args.model] if args.model is not None else []
        check_target(args.save, overwrite=args.overwrite, protected=inputs)
    clock = StageClock()  # load = tokenizer, evaluation and calibration tokens, weights
    model_dir = model_directory(args.model)
    check_float_checkpoint(model_dir)
    tokenizer = load_tokenizer(model_dir)
    ids = eval_token_ids(tokenizer) if args.eval and save_here else None
    if ids is not None:
        count_windows(ids, args.eval)
    calib = None
    if pm.needs_calibration or args.calib_data is not None:
        calib = calibration_from_args(args, tokenizer)
        if not pm.needs_calibration:
            print("note: the pipeline calibrates nothing; --calib-data is unused", file=sys.stderr)
            calib = None
    work_dir = open_work_dir(args, model_dir, pm, calib, work_suffix)  # before the long part
    with failure_keeps_records(work_dir):
        # in the checkpoint's dtype (a bf16 checkpoint stays memory-mapped); every computation
        # below is float32, widening one layer's weights at a time
        model = load_causal_lm(model_dir, dtype="auto")
        check_ignore_patterns(model, ignore_patterns(args))
        clock.lap("load")
        print(f"pipeline: {pm.pipeline_spec(include_defaults=True)}", file=sys.stderr)
        rows: list[tuple[str, ...]] = [("model", "PPL", "delta", "quant time s", "peak RSS MB")]
        fp32_ppl = None
        if ids is not None:
            fp32 = perplexity(model, ids, windows=args.eval, compute_dtype=torch.float32)
            fp32_ppl = fp32.ppl
            clock.lap("eval")
            rows.append(("fp32", f"{fp32.ppl:.3f}", "", "", f"{peak_rss_mb():.0f}"))
        start = time.perf_counter()
        # the float model is not used again: quantizing it in place saves a full copy of it
        quantized = slimc.compile(model, pm.steps, calib=calib, inplace=True, work_dir=work_dir)
        seconds = time.perf_counter() - start
        clock.lap("capture+passes")  # capture, calibration, quantization
        if not save_here:
            if work_dir is not None:
                work_dir.remove()
            return 0
        qppl = ""
        delta = ""
        if ids is not None:
            q = perplexity(quantized, ids, windows=args.eval, compute_dtype=torch.float32)
            qppl, delta = f"{q.ppl:.3f}", f"{100 * (q.ppl / fp32_ppl - 1):+.2f}%"
            clock.lap("eval")
        if args.save is not None:
            fmt = choose_format(quantized, args.format)
            save(quantized, args.save, format=fmt, tokenizer=tokenizer, overwrite=args.overwrite)
            print(f"saved {fmt} model to {args.save}", file=sys.stderr)
            if work_dir is not None:
                work_dir.remove()
            clock.lap("save")
    label = " + ".join(
        [args.quant_type]
        + ([args.rotation] if args.rotation else [])
        + ([args.anti_outlier] if args.anti_outlier else [])
        + ([args.weight_method] if args.weight_method != "rtn" else [])
    )
    # the whole run's peak: quantization, the quantized evaluation and the save included
    rows.append((label, qppl, delta, f"{seconds:.1f}", f"{peak_rss_mb():.0f}"))
    if ids is not None:
        print(f"\nPPL on {args.eval} windows of 512 tokens (wiki):")
    print(table(rows))
    print(clock.summary())
    return 0


def _quant_on_ranks(args: argparse.Namespace, pm: Any) -> int:
    """`cmd_quant` as one of several ranks: the calibration samples are split across them and
    their statistics reduced (`slimc.distributed`); rank 0 evaluates and saves, and prints the
    table; every rank reports its peak RSS."""
    from slimc import distributed
    from slimc.compiler import check_ranks_supported
    from slimc.errors import UserError

    check_ranks_supported(pm)
    if args.resume:
        raise UserError("--resume runs in one process: restart the distributed run instead")

    def stop(signum: int, frame: Any) -> None:  # torchrun stops the others when a rank fails
        raise SystemExit(128 + signum)  # unwinds: the work directory is removed

    signal.signal(signal.SIGTERM, stop)
    rank, size = distributed.rank(), distributed.world_size()
    if rank > 0:  # rank 0 logs the run; the others only what goes wrong
        logging.getLogger("slimc").setLevel(logging.WARNING)
    if rank == 0:
        print(f"calibrating on {size} ranks", file=sys.stderr)
        code = _quant(args, pm, work_suffix="")
    else:  # calibrates its share; writes nothing but its own work directory
        code = _quant(args, pm, work_suffix=f".rank{rank}", save_here=False)
    print(f"rank {rank} of {size}: peak RSS {peak_rss_mb():.0f} MB", file=sys.stderr)
    return code


def cmd_eval(args: argparse.Namespace) -> int:
    from slimc.data import eval_token_ids, load_causal_lm, model_directory
    from slimc.errors import UserError
    from slimc.evaluate import count_windows, perplexity
    from slimc.model_dir import load_tokenizer

    pt2 = args.model is not None and (Path(args.model).expanduser() / "model.pt2").is_file()
    model_dir = Path(args.model).expanduser() if pt2 else model_directory(args.model)
    tokenizer = load_tokenizer(model_dir)
    ids = eval_token_ids(tokenizer, args.text)
    count_windows(ids, args.windows)  # before the model loads
    bos = tokenizer.bos_token_id if args.bos_per_window else None
    if args.bos_per_window and bos is None:
        raise UserError(f"--bos-per-window: the tokenizer of {model_dir} has no BOS token")
    from slimc.export import check_transformers_loadable, load

    if pt2:
        model = load(model_dir)
    else:
        check_transformers_loadable(model_dir)
        model = load_causal_lm(model_dir)
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
        "SmolLM2-135M-Instruct) and save it. Started by `torchrun --nproc-per-node N -m "
        "slimc.tools.cli quant ...`, N processes split the calibration samples and reduce "
        "their statistics (rtn / gptq / ssz, smooth-quant, iter-smooth); rank 0 saves.",
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
        type=group_size,
        default=None,
        help="weight group size along K, a positive number (default, or -1: per output channel)",
    )
    q.add_argument("--symmetric", action="store_true", help="symmetric weights (w4a16/w8a16)")
    q.add_argument(
        "--anti-outlier",
        choices=tuple(passes_with_role("anti-outlier")),
        default=None,
        help="outlier suppression pass run before quantizing (default: none); searching "
        "passes are set up for the chosen --quant-type",
    )
    q.add_argument(
        "--rotation",
        choices=tuple(passes_with_role("rotation")),
        default=None,
        help="rotate the residual stream first (exact): quarot = seeded random Hadamard, "
        "adapt-rotation = Hadamard refined on calibration data for the scheme's activation "
        "quantizer (default: none)",
    )
    q.add_argument(
        "--weight-method",
        choices=tuple(passes_with_role("weight-method")),
        default="rtn",
        help="how weights are rounded: rtn (MinMax round-to-nearest, default), gptq (Hessian "
        "error compensation on calibration data), ssz (data-free least-squares range refit), "
        "autoround (rounding offsets learned per decoder layer with SignSGD; slowest)",
    )
    q.add_argument(
        "--observer",
        choices=("minmax", "histogram"),
        default="histogram",
        help="static activation range observer for w8a8 (default histogram: L2 clip search "
        "over a histogram of up to 4096 bins, independent of sample order; minmax: the full "
        "observed range)",
    )
    q.add_argument(
        "--calibrate-all-experts",
        action="store_true",
        help="MoE models: every expert sees every calibration token for its static ranges and "
        "gptq / ssz inputs, not only the tokens routed to it (the forward keeps its routing); "
        "no expert then falls back to round to nearest for lack of tokens",
    )
    ignored = q.add_mutually_exclusive_group()
    ignored.add_argument(
        "--ignore",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="module-path globs left in float, each matching at least one linear (an error "
        "otherwise); replaces the default lm_head; --ignore '' ignores nothing",
    )
    ignored.add_argument(
        "--no-ignore",
        action="store_true",
        help="quantize every linear, lm_head included (same as --ignore '')",
    )
    add_calibration_arguments(q)
    q.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="output format: auto (default) = compressed-tensors, loadable by transformers, "
        "when it can express the model, else pt2 (read by slimc eval and slimc.load); "
        "compressed-tensors also writes quantized MoE experts, one linear per expert as vLLM "
        "reads them (transformers cannot load those); ascend-v1 = msModelSlim's AscendV1 for "
        "MindIE / vLLM-Ascend",
    )
    q.add_argument("--save", default=None, metavar="DIR", help="output directory")
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --save directory that holds a model (config.json with "
        "weights, or a slimc pt2 / ascend-v1 output); never the working, home or --model "
        "directory, nor a directory holding other files",
    )
    q.add_argument(
        "--work-dir",
        default=None,
        metavar="DIR",
        help="where the run keeps each finished layer: the quantized tensors (memory-mapped, "
        "so the process holds about one layer of them) and what --resume needs (default: "
        "<save>.work beside --save); removed after a successful save",
    )
    q.add_argument(
        "--resume",
        action="store_true",
        help="continue the run that was stopped (killed, out of memory) from its work "
        "directory: the finished layers are not calibrated again and the checkpoint is the "
        "one an uninterrupted run writes",
    )
    q.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="under torchrun (which splits the calibration samples across its processes): how "
        "long a rank waits for the others at a reduction before the run stops with an error "
        "(default 1800; rank 0 evaluates --eval alone while the others wait)",
    )
    q.add_argument(
        "--eval",
        type=int_at_least(0, "a number of windows >= 0"),
        default=0,
        metavar="N",
        help="also measure fp32 and quantized PPL on N windows (protocol of data.md)",
    )
    q.set_defaults(func=cmd_quant)

    e = sub.add_parser("eval", help="perplexity of a model on wiki text or a text file")
    e.add_argument("--model", default=None, help="model directory (HF, compressed-tensors or pt2)")
    e.add_argument("--text", default="wiki", help="'wiki' (default) or a UTF-8 text file")
    e.add_argument(
        "--windows",
        type=int_at_least(1, "a positive number of windows"),
        default=40,
        help="number of 512-token windows",
    )
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
    return_freed_memory_to_os()
    return run_guarded("slimc", lambda: args.func(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
