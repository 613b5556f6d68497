"""Core engines passes build on: linear quantization's weight methods, the rotation base, kernel
loading through the registry, and the typed run context."""

from __future__ import annotations

import torch

from slimc import registry
from slimc.capture import capture
from slimc.passes.autoround import AutoRound, LayerTuning
from slimc.passes.gptq import GPTQ, GPTQRounding
from slimc.passes.linear_quant import LinearQuant
from slimc.passes.ssz import SSZ, SSZRefit
from slimc.program import RunContext
from slimc.quant.linear_engine import LinearQuantEngine
from slimc.quant.weight_method import RoundToNearest
from slimc.rotate.residual import ResidualRotation
from slimc.runner import LayerwiseRunner
from tests.models import tiny_llama


def test_engines_are_not_registered_passes() -> None:
    refs = set(registry.discover_passes(registry.PASS_PACKAGE).values())
    assert not any(ref.endswith((":LinearQuantEngine", ":ResidualRotation")) for ref in refs)
    for name in ("linear-quant", "gptq", "ssz", "autoround"):
        assert issubclass(registry.get_pass(name), LinearQuantEngine)
    for name in ("quarot", "adapt-rotation"):
        assert issubclass(registry.get_pass(name), ResidualRotation)


def test_each_quantizer_hands_the_engine_its_weight_method() -> None:
    assert type(LinearQuant().weight_method()) is RoundToNearest
    gptq = GPTQ(block_size=64, percdamp=0.05).weight_method()
    assert isinstance(gptq, GPTQRounding) and (gptq.block_size, gptq.percdamp) == (64, 0.05)
    assert gptq.reads_inputs
    assert SSZRefit(3, weighted=True).reads_inputs
    assert not SSZ(weighting="none").weight_method().reads_inputs
    tuning = AutoRound(iters=10, seqlen=0, amp=False).weight_method()
    assert isinstance(tuning, LayerTuning) and tuning.tune.iters == 10 and not tuning.amp


def test_kernel_families_load_through_the_registry() -> None:
    assert registry.load_kernel_family("cpu").__name__ == "slimc.kernels.cpu"
    assert "cpu" in registry.load_kernel_families()


def test_layerwise_runner_reads_progress_from_the_run_context() -> None:
    model = tiny_llama()
    program = capture(model, (torch.randint(0, 128, (1, 8)),))
    sample = [(torch.randint(0, 128, (1, 8)),)]
    assert program.context == RunContext() and LayerwiseRunner(program, sample).progress
    program.context = RunContext(progress=False)
    assert not LayerwiseRunner(program, sample).progress
    assert LayerwiseRunner(program, sample, progress=True).progress  # an explicit choice wins
