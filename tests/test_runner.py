"""LayerwiseRunner: values computed from constants only are computed once and equal per-sample runs."""

from __future__ import annotations

import torch

import slimc
from slimc.runner import LayerwiseRunner, sample_independent, split_segments
from tests.models import tiny_llama

slimc_ops = torch.ops.slimc


def _quantized_program():
    model = tiny_llama()
    return slimc.compile(model, "linear-quant{scheme=w8a16 only=*mlp*}", progress=False).slimc_program


def test_weight_dequantization_is_sample_independent_and_activations_are_not():
    program = _quantized_program()
    segment = next(s for s in split_segments(program.graph) if s.key == "model.layers.0")
    constant = sample_independent(segment.nodes, {})
    dequantized = [n for n in constant if n.target == slimc_ops.dequantize_affine.default]
    assert len(dequantized) == 3  # gate, up, down weights
    assert all(n.args[0].op == "get_attr" for n in dequantized)
    assert not any(n.target == torch.ops.aten.linear.default for n in constant)
    hooked = {dequantized[0]: lambda node, args: None}
    assert dequantized[0] not in sample_independent(segment.nodes, hooked)


def test_runner_outputs_equal_the_program_run_per_sample():
    program = _quantized_program()
    gen = torch.Generator().manual_seed(3)
    samples = [(torch.randint(0, 128, (1, n), generator=gen),) for n in (5, 17, 9)]
    runner = LayerwiseRunner(program, samples, progress=False, keep_outputs=True)
    runner.run(lambda seg, r: None)
    for (ids,), out in zip(samples, runner.outputs(), strict=True):
        got = out[0] if isinstance(out, (tuple, list)) else out
        assert torch.equal(got, program(ids))
