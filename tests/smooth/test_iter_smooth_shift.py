"""iter-smooth shift=true: channel shifts folded into a norm output bias and linear biases."""

from __future__ import annotations

import pytest
import torch

import slimc
from slimc.analyses.activation_stats import ActivationStats
from slimc.analysis import AnalysisManager
from slimc.errors import UserError
from slimc.nn import OutputBias, QuantizedLinear
from slimc.pass_manager import PassManager
from slimc.program import RunContext
from slimc.smooth.shift import NORM_BIAS_KEY
from tests.models import tiny_llama

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (1, 32), generator=gen) for _ in range(4)]


def test_shift_keeps_float_outputs_and_writes_back_norm_biases() -> None:
    model = tiny_llama(layers=2)
    smoothed = slimc.compile(model, "iter-smooth{shift=true}", calib=calib(), progress=False)
    with torch.no_grad():
        ref, out = model(IDS).logits, smoothed(IDS).logits
        graph = smoothed.slimc_program(IDS)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    assert torch.equal(graph, out)
    norms = [m for m in smoothed.modules() if isinstance(m, OutputBias)]
    assert len(norms) == 4  # input and post-attention norm of both layers
    assert all(float(n.bias.abs().max()) > 0 for n in norms)
    q_proj = smoothed.model.layers[0].self_attn.q_proj
    assert q_proj.bias is not None and float(q_proj.bias.detach().abs().max()) > 0
    stats = smoothed.slimc_program.statistics["iter-smooth"]
    assert stats["shifts folded into biases"] == 4


def test_shifted_inputs_are_centred_and_statistics_follow() -> None:
    from slimc.capture import capture

    program = capture(tiny_llama(layers=1))
    program.calibration = [(ids,) for ids in calib()]
    program.context = RunContext(progress=False)
    am = AnalysisManager(program)
    PassManager.parse("iter-smooth{shift=true}").run(program, am)
    # the analytically updated statistics match a fresh computation on the shifted program
    updated = am.get(ActivationStats)
    shifted = [n for n in program.graph.nodes if n.meta.get(NORM_BIAS_KEY)]
    assert len(shifted) == 2
    fresh = ActivationStats.compute(program)
    for node in shifted:
        st = fresh[node]
        # centred: each channel's range is symmetric around zero
        torch.testing.assert_close(st.max, -st.min, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(updated[node].max, st.max, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(updated[node].absmax, st.absmax, atol=1e-4, rtol=1e-4)


def test_compressed_tensors_refuses_norm_biases_and_pt2_keeps_them(tmp_path) -> None:
    model = tiny_llama(layers=1)
    q = slimc.compile(model, "iter-smooth{shift=true},w8a8", calib=calib(), progress=False)
    assert any(isinstance(m, QuantizedLinear) for m in q.modules())
    with pytest.raises(UserError, match="bias after model.layers.0.input_layernorm.*pt2"):
        slimc.save(q, tmp_path / "ct")
    slimc.save(q, tmp_path / "pt2", format="pt2")
    reloaded = slimc.load(tmp_path / "pt2")
    with torch.no_grad():
        want = q(IDS).logits
        got = reloaded(IDS)
    got = got.logits if hasattr(got, "logits") else got
    torch.testing.assert_close(got, want)
