"""`slimc.compile` (compile_model): capture a model, run a pipeline on it, and return a runnable model."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimc.capture import capture, is_hf_causal_lm
from slimc.errors import UserError
from slimc.instrumentation import Instrumentation
from slimc.pass_base import Pass
from slimc.pass_manager import PassManager
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


def default_calibration(model: nn.Module) -> list[tuple[Any, ...]]:
    """The default calibration set (data.md protocol) for a causal LM with a local tokenizer."""
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


def compile_model(
    model: nn.Module,
    passes: str | Sequence[str | Pass] = "",
    *,
    calib: Any = None,
    example_inputs: Sequence[Any] | None = None,
    inplace: bool = False,
    instrumentations: Sequence[Instrumentation] = (),
    progress: bool = True,
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
            data; for a causal LM with a local tokenizer the default set is used otherwise.
        example_inputs: inputs to capture with (default for causal LMs: random token ids).
        inplace: modify and return `model` itself instead of a copy.

    Raises:
        slimc.errors.UserError: bad pipeline, missing calibration data, model not exportable.
        slimc.pass_base.PassFailure: a pass failed; the message names its pipeline position.
    """
    pm = PassManager.parse(passes, instrumentations=instrumentations)
    samples = normalize_calibration(calib)
    if samples is None and pm.needs_calibration:
        if not is_hf_causal_lm(model):
            raise UserError("this pipeline needs calibration data: pass calib=...")
        samples = default_calibration(model)
    target = model if inplace else copy.deepcopy(model)
    program = capture(target, example_inputs)
    program.calibration = samples
    program.metadata["progress"] = progress
    pm.run(program)
    write_back(target, program)
    target.slimc_program = program  # type: ignore[assignment]
    return target
