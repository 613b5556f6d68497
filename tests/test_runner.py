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


def test_runner_times_every_layer_and_logs_the_spread(caplog):
    program = _quantized_program()
    samples = [(torch.randint(0, 128, (1, 6)),) for _ in range(2)]
    runner = LayerwiseRunner(program, samples, progress=False)
    with caplog.at_level("INFO", logger="slimc.runner"):
        runner.run(lambda seg, r: None)
    assert list(runner.layer_seconds) == ["prologue", "model.layers.0", "model.layers.1", "epilogue"]
    assert all(s >= 0 for s in runner.layer_seconds.values())
    assert "calibration: 2 layers on 2 samples" in caplog.text


def _samples():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 128, (1, n), generator=gen),) for n in (4, 11)]


def test_a_visit_that_ran_the_whole_segment_is_not_run_again():
    program = _quantized_program()
    runner = LayerwiseRunner(program, _samples(), progress=False, keep_outputs=True)
    runner.run(lambda seg, r: r.forward(seg.nodes, {}, advance=True))
    assert runner.reused_segments == 4  # prologue, two layers, and the epilogue's kept logits
    for (ids,), out in zip(_samples(), runner.outputs(), strict=True):
        assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, program(ids))


def test_a_visit_that_ran_part_of_the_segment_is_advanced_by_the_runner():
    program = _quantized_program()
    runner = LayerwiseRunner(program, _samples(), progress=False, keep_outputs=True)
    runner.run(lambda seg, r: r.forward(seg.nodes[: len(seg.nodes) // 2], {}, advance=True))
    assert runner.reused_segments == 0
    for (ids,), out in zip(_samples(), runner.outputs(), strict=True):
        assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, program(ids))
