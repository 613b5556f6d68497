"""slimc.compile end to end on tiny models: write-back, exactness of capture and fusion, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimc
from slimc.capture import capture
from slimc.errors import PipelineError, UserError
from slimc.nn import QuantizedLinear
from slimc.pass_manager import PassManager
from slimc.program import RunContext
from slimc.runner import LayerwiseRunner, split_segments
from tests.models import tiny_llama

SCHEMES = [
    "w8a8",
    "w8a8-dynamic",
    "w8a16",
    "w4a16",
    "w4a16{group-size=32}",
    "w4a16{group-size=32 symmetric=true}",
    "w4a8",
    "w8a16{group-size=16}",
]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (1, 24), generator=gen) for _ in range(4)]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_capture_is_exact_and_dynamic(model: nn.Module) -> None:
    program = capture(model)
    for shape in [(1, 5), (3, 17)]:
        ids = torch.randint(0, 128, shape)
        torch.testing.assert_close(program(ids), model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("pipeline", SCHEMES)
def test_written_back_model_matches_graph(model, calib, tokens, pipeline: str) -> None:
    quantized = slimc.compile(model, pipeline, calib=calib, progress=False)
    graph_out = quantized.slimc_program(tokens)
    module_out = quantized(tokens).logits
    torch.testing.assert_close(module_out, graph_out, rtol=0, atol=0)
    assert isinstance(quantized.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert isinstance(quantized.lm_head, nn.Linear), "lm_head is ignored by default"
    assert _rel(module_out, model(tokens).logits) < 0.2


def test_compile_leaves_input_untouched(model, tokens) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(tokens).logits
    slimc.compile(model, "w4a16", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(model(tokens).logits, ref, rtol=0, atol=0)


def test_inplace_modifies_input(tokens) -> None:
    m = tiny_llama(seed=3)
    out = slimc.compile(m, "w8a16", inplace=True, progress=False)
    assert out is m and isinstance(m.model.layers[1].self_attn.o_proj, QuantizedLinear)


@pytest.mark.parametrize(
    "scheme", ["w8a8", "w8a8-dynamic", "w8a16", "w4a16{group-size=32}", "w4a8"]
)
def test_fusion_is_exact(model, calib, tokens, scheme: str) -> None:
    name, _, opts = scheme.partition("{")
    qdq = "linear-quant{scheme=" + name + (" " + opts if opts else "}")
    program = capture(model)
    program.calibration = [(c,) for c in calib]
    program.context = RunContext(progress=False)
    PassManager.parse(qdq).run(program)
    ref = program(tokens)
    PassManager.parse("fuse-quantized-linear", start_stage=slimc.Stage.QDQ).run(program)
    assert program.stage is slimc.Stage.FUSED
    torch.testing.assert_close(program(tokens), ref, rtol=1e-5, atol=1e-5)


def test_ignore_and_only_globs(model) -> None:
    q = slimc.compile(
        model, "linear-quant{scheme=w8a16 only=layers.0.* ignore=*.o_proj}", progress=False
    )
    assert isinstance(q.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert type(q.model.layers[0].self_attn.o_proj) is nn.Linear
    assert type(q.model.layers[1].self_attn.q_proj) is nn.Linear


def test_pipeline_can_continue_after_named_pipeline(model) -> None:
    pm = PassManager.parse("w8a8-dynamic,canonicalize")
    assert pm.end_stage is slimc.Stage.FUSED
    assert pm.pipeline_spec() == "linear-quant,fuse-quantized-linear,canonicalize"


def test_group_size_fallback_and_refusal(model) -> None:
    q = slimc.compile(model, "w4a16{group-size=48}", progress=False)
    stats = q.slimc_program.statistics["linear-quant"]
    assert stats["group-size fallbacks to per-channel"] == 14
    assert q.model.layers[0].mlp.up_proj.group_size == -1
    with pytest.raises(UserError, match="group size 48 does not divide K=64"):
        slimc.compile(model, "w4a16{group-size=48 on-bad-group=error}", progress=False)


def test_static_needs_calibration_for_plain_modules() -> None:
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(UserError, match="needs calibration"):
        slimc.compile(mlp, "w8a8", example_inputs=(torch.randn(2, 16),))
    with pytest.raises(UserError, match="calibration set is empty"):
        slimc.compile(mlp, "w8a8", calib=[], example_inputs=(torch.randn(2, 16),))


def test_plain_module_is_quantized_and_runnable() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(5, 16)
    calib = [(torch.randn(5, 16),) for _ in range(3)]
    q = slimc.compile(
        mlp,
        'linear-quant{scheme=w8a8 ignore=""},fuse-quantized-linear',
        calib=calib,
        example_inputs=(x,),
        progress=False,
    )
    assert isinstance(q[0], QuantizedLinear) and isinstance(q[2], QuantizedLinear)
    assert _rel(q(x), mlp(x)) < 0.05


def test_nan_weight_is_refused(model) -> None:
    bad = tiny_llama(seed=4)
    with torch.no_grad():
        bad.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj.weight holds NaN or inf"):
        slimc.compile(bad, "w8a16", progress=False)


def test_nan_activation_is_refused() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.log(x))

    calib = [(torch.tensor([[-1.0, 1.0, 2.0, 3.0]]),)]
    with pytest.raises(UserError, match="input of fc: .*NaN or inf"):
        slimc.compile(
            Bad(),
            "linear-quant{scheme=w8a8}",
            calib=calib,
            example_inputs=(torch.ones(1, 4),),
            progress=False,
        )


def test_unexportable_model_is_a_user_error() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(UserError, match="cannot export DataDependent"):
        slimc.compile(DataDependent(), "w8a16", example_inputs=(torch.ones(2),))


def test_bad_pipeline_fails_before_capture(model) -> None:
    with pytest.raises(PipelineError, match="unknown pass 'w8a9'"):
        slimc.compile(model, "w8a9")


def test_runner_segments_follow_decoder_layers(model, calib) -> None:
    program = capture(model)
    labels = [s.label for s in split_segments(program.graph)]
    assert labels == ["prologue", "model.layers.0", "model.layers.1", "epilogue"]
    runner = LayerwiseRunner(program, [(c,) for c in calib], progress=False, keep_outputs=True)
    runner.run(lambda seg, r: None)
    for (ids,), out in zip([(c,) for c in calib], runner.outputs(), strict=True):
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, program(ids))
