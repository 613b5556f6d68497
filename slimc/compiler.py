"""`slimc.compile` (compile_model): capture a model, run a pipeline on it, and return a runnable model."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimc import distributed
from slimc.capture import capture, is_hf_causal_lm
from slimc.errors import UserError
from slimc.instrumentation import Instrumentation
from slimc.nn import QuantizedLinear
from slimc.pass_base import Pass
from slimc.pass_manager import PassManager
from slimc.program import RunContext
from slimc.weight_source import copy_sharing_tensors, needs_widening
from slimc.weight_spill import SpillArea
from slimc.work_dir import SPILL, WorkDir
from slimc.write_back import write_back

log = logging.getLogger(__name__)


def normalize_calibration(calib: Any) -> list[tuple[Any, ...]] | None:
    """Accept token-id tensors ([L] or [1, L]), tuples of inputs, or a list of them.

    Raises:
        UserError: an empty calibration set or an item of an unsupported type.
    """
    if calib is None:
        return None
    if isinstance(calib, torch.Tensor):
        calib = [calib] if calib.dim() < 2 else list(calib.split(1))
    items = list(calib)
    if not items:
        raise UserError("the calibration set is empty")
    out: list[tuple[Any, ...]] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            out.append((item.unsqueeze(0) if item.dim() == 1 else item,))
        elif isinstance(item, (tuple, list)):
            out.append(tuple(item))
        elif isinstance(item, dict) and "input_ids" in item:
            ids = item["input_ids"]
            out.append((ids.unsqueeze(0) if ids.dim() == 1 else ids,))
        else:
            raise UserError(
                f"calibration item {i} is a {type(item).__name__}; expected a tensor or tuple"
            )
    return out


def check_compile_inputs(model: Any, passes: Any) -> None:
    """Refuse what `compile` cannot take, with the reason: not a module, a hub id, a pipeline
    that is neither a string nor a list of passes, a model slimc or another tool quantized.

    Raises:
        UserError: naming the offending argument.
    """
    if isinstance(model, (str, os.PathLike)):
        where = Path(model).expanduser()
        how = (
            f"load it first: model, tokenizer = slimc.data.load_model({str(model)!r})"
            if where.is_dir()
            else "a local model directory is needed (slimc does not download from the "
            "Hugging Face Hub): download it, then load it with slimc.data.load_model(DIR)"
        )
        raise UserError(f"slimc.compile needs an nn.Module, not the path {str(model)!r}; {how}")
    if not isinstance(model, nn.Module):
        raise UserError(
            f"slimc.compile needs an nn.Module as the model, got {type(model).__name__}"
        )
    if not isinstance(passes, (str, Pass, Sequence)):  # list items: checked by PassManager
        raise UserError(
            "slimc.compile needs the pipeline as a string (\"w8a8-dynamic\") or a list of "
            f"passes, got {type(passes).__name__} {repr(passes)[:60]}"
        )

    compiled = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if compiled or hasattr(model, "slimc_program"):
        where = f" ({compiled[0]} is a slimc QuantizedLinear)" if compiled else ""
        raise UserError(
            f"the model is already compiled by slimc{where}: compile the float model once with "
            "the whole pipeline (e.g. \"w8a8-dynamic,lower-cpu\")"
        )
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization:
        method = getattr(quantization, "quant_method", None)
        if isinstance(quantization, dict):
            method = quantization.get("quant_method")
        raise UserError(
            f"the model is already quantized (quantization_config: quant_method={method}); "
            "compile its float checkpoint instead"
        )


def check_token_ids(model: nn.Module, samples: list[tuple[Any, ...]] | None) -> None:
    """Refuse empty calibration samples and, for causal LMs, token ids outside the vocabulary.

    Raises:
        UserError: naming the sample.
    """
    if samples is None:
        return
    vocab = None
    if is_hf_causal_lm(model) and model.get_input_embeddings() is not None:
        vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    for i, sample in enumerate(samples):
        ids = sample[0] if sample else None
        if not isinstance(ids, torch.Tensor):
            continue
        if ids.numel() == 0:
            raise UserError(f"calibration sample {i} is empty (shape {list(ids.shape)})")
        if vocab is None or ids.is_floating_point() or ids.is_complex():
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise UserError(
                f"calibration sample {i} holds token id {bad}, outside the model's vocabulary "
                f"of {vocab} (0..{vocab - 1}): was it tokenized with this model's tokenizer?"
            )


def default_calibration(model: nn.Module) -> list[tuple[Any, ...]]:
    """The default calibration set (data.md protocol) for a causal LM with a local tokenizer."""
    # transformers takes seconds to import; slimc.data pulls it in too
    from transformers import AutoTokenizer

    from slimc.data import calibration_samples

    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise UserError(
            f"this pipeline needs calibration data and no tokenizer was found for {source!r}: "
            "pass calib=[token id tensors]"
        ) from exc
    return [(ids,) for ids in calibration_samples(tokenizer)]


def check_ranks_supported(pm: PassManager) -> None:
    """Refuse, in a distributed run, a pipeline with a pass whose calibration is not reduced
    over the ranks (it would search or train on one rank's samples only).

    Raises:
        UserError: such a pass, named with what to do instead.
    """
    if not distributed.active():
        return
    refused = [
        s.name
        for s in pm.steps
        if isinstance(s, Pass) and s.needs_calibration and not s.calibrates_across_ranks
    ]
    if refused:
        raise UserError(
            f"{', '.join(refused)} cannot calibrate across {distributed.world_size()} ranks: "
            "its search or training reads one rank's samples only (the sensitivity ranking "
            "too); run it in one process"
        )


def compile_model(
    model: nn.Module,
    passes: str | Sequence[str | Pass] = "",
    *,
    calib: Any = None,
    example_inputs: Sequence[Any] | None = None,
    inplace: bool = False,
    instrumentations: Sequence[Instrumentation] = (),
    progress: bool = True,
    compute_dtype: torch.dtype | None = torch.float32,
    work_dir: WorkDir | None = None,
) -> nn.Module:
    """Capture `model`, run the pipeline `passes` on it, and return a runnable model.

    The returned model keeps the input's class and API (for a Hugging Face model: `generate`,
    `save_pretrained`, `config`): transformed weights are written back and each quantized linear
    becomes a `slimc.nn.QuantizedLinear` calling the `slimc::` ops. The transformed program is
    available as `result.slimc_program`.

    Args:
        model: an `nn.Module` (a Hugging Face causal LM, or any module with `example_inputs`).
        passes: a pipeline string (`"w8a8-dynamic"`, `"linear-quant{scheme=w4a16},..."`) or a
            list of pass objects / pipeline strings.
        calib: calibration samples (token-id tensors or input tuples). Optional when no pass needs
            data; for a causal LM with a local tokenizer the default set is used otherwise. In
            a distributed run (`slimc.distributed`) every rank gives the same samples and
            calibrates on its share; the statistics are reduced over the ranks.
        example_inputs: inputs to capture with (default for causal LMs: random token ids).
        inplace: modify and return `model` itself instead of a copy.
        instrumentations: hooks the pass manager calls around every pass (timing, IR dumps).
        progress: show a progress bar for the passes that report progress.
        compute_dtype: the dtype calibration and the passes compute in. A model stored in a
            narrower float dtype (bf16, fp16) is captured in `compute_dtype` without a copy in
            that dtype: each weight is read and widened when a pass or the calibration runner
            needs it, and the model's tensors are never written (so `inplace=False` copies no
            weight either). Weights a pass changes are written back in the model's dtype. None
            computes in the model's own dtype.
        work_dir: where layer-wise passes record finished layers and find those a stopped
            run finished (`slimc.work_dir.WorkDir.open`), and where the tensors passes write
            move to memory-mapped files as layers finish (so the process holds about one
            layer of them); None records nothing and keeps every tensor in memory.

    Raises:
        slimc.errors.UserError: bad pipeline, missing calibration data, model not exportable.
        slimc.pass_base.PassFailure: a pass failed; the message names its pipeline position.
    """
    check_compile_inputs(model, passes)
    if isinstance(passes, Pass):
        passes = [passes]
    pm = PassManager.parse(passes, instrumentations=instrumentations)
    check_ranks_supported(pm)
    samples = normalize_calibration(calib)
    check_token_ids(model, samples)
    if samples is None and pm.needs_calibration:
        if not is_hf_causal_lm(model):
            raise UserError("this pipeline needs calibration data: pass calib=...")
        samples = default_calibration(model)
    if samples is not None and pm.needs_calibration:
        samples = distributed.shard(samples)  # every rank its share (all of them on one)
    if needs_widening(model, compute_dtype):  # weights are read, never written: no copy
        target = model if inplace else copy_sharing_tensors(model)
    else:
        target = model if inplace else copy.deepcopy(model)
    program = capture(target, example_inputs, compute_dtype=compute_dtype)
    program.calibration = samples
    spill = SpillArea(work_dir.path / SPILL) if work_dir is not None else None
    shown = progress and distributed.rank() == 0  # one bar, not one per rank
    program.context = RunContext(progress=shown, work_dir=work_dir, spill=spill)
    pm.run(program)
    write_back(target, program)
    target.slimc_program = program  # type: ignore[assignment]
    return target
