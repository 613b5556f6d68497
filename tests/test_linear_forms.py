"""Linears that are not `nn.Linear` in the graph (GPT-2's Conv1D, FalconLinear): recognised,
quantized, written back into the user's modules, saved in the format that can hold them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import slimc
from slimc.capture import capture
from slimc.errors import UserError
from slimc.linear_forms import RECOGNIZED_LINEARS_KEY, TRANSPOSED_WEIGHTS_KEY
from slimc.nn import QuantizedLinear
from tests.models import tiny_falcon, tiny_gpt2, tiny_mlp

FAMILIES = {"gpt2": tiny_gpt2, "falcon": tiny_falcon}
SCHEMES = ["w8a8-dynamic", "w4a16{group-size=32}"]
X = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(7))
_FLOAT: dict[str, nn.Module] = {}
_COMPILED: dict[tuple[str, str], nn.Module] = {}


def _float(family: str) -> nn.Module:
    if family not in _FLOAT:
        _FLOAT[family] = FAMILIES[family]()
    return _FLOAT[family]


def _compiled(family: str, scheme: str) -> nn.Module:
    if (family, scheme) not in _COMPILED:
        _COMPILED[family, scheme] = slimc.compile(_float(family), scheme, progress=False)
    return _COMPILED[family, scheme]


def _logits(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _linear_layers(model: nn.Module) -> list[str]:
    """Module paths of the model's linear layers (Conv1D included), lm_head excluded."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and name != "lm_head"
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_recognises_every_linear_exactly(family: str) -> None:
    model = _float(family)
    program = capture(model)
    linears = program.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
    assert len(linears) == len(_linear_layers(model)) + 1  # + lm_head
    assert sorted(program.metadata[RECOGNIZED_LINEARS_KEY]) == sorted(_linear_layers(model))
    transposed = program.metadata.get(TRANSPOSED_WEIGHTS_KEY, [])
    assert len(transposed) == (len(_linear_layers(model)) if family == "gpt2" else 0)
    assert _rel(program(X), _logits(model)) < 1e-6  # linear(x, W, b) vs x @ W.T + b: rounding


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_is_quantized_into_the_users_model(family: str, scheme: str) -> None:
    model, q = _float(family), _compiled(family, scheme)
    quantized = sorted(n for n, m in q.named_modules() if isinstance(m, QuantizedLinear))
    assert quantized == sorted(_linear_layers(model))
    assert type(q.get_submodule("lm_head")) is nn.Linear
    replaced = {m.replaced_type for m in q.modules() if isinstance(m, QuantizedLinear)}
    assert replaced == ({"Conv1D"} if family == "gpt2" else {None})
    assert _rel(_logits(q), _logits(model)) < 3e-2
    torch.testing.assert_close(_logits(q), q.slimc_program(X), rtol=1e-5, atol=1e-5)
    generated = q.generate(X[:1, :6], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 11) and torch.equal(generated[:, :6], X[:1, :6])


def test_quantized_falcon_runs_with_autograd_enabled() -> None:
    """Falcon adds to a linear's output in place; the weight-only op returned a view (refused)."""
    q = _compiled("falcon", "w4a16{group-size=32}")
    out = q(X).logits  # grad mode on: the embedding and norms still require grad
    torch.testing.assert_close(out.detach(), _logits(q))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_falcon_saves_as_compressed_tensors_and_reloads_in_transformers(tmp_path, scheme):
    q = _compiled("falcon", scheme)
    out = slimc.save(q, tmp_path / "ct", format="auto")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    reloaded = slimc.load(out)
    if scheme.startswith("w4a16"):  # weight-only: the same float computation
        torch.testing.assert_close(_logits(reloaded), _logits(q), rtol=1e-4, atol=1e-5)
    else:  # compressed-tensors emulates per-token scales with absmax / 127.5 (slimc: / 127)
        assert _rel(_logits(reloaded), _logits(q)) < 3e-2
    for name in _linear_layers(q):
        want = q.get_submodule(name).dequantized_weight()
        torch.testing.assert_close(
            reloaded.get_submodule(name).weight.float(), want, rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpt2_saves_as_pt2_and_reloads(tmp_path, scheme):
    q = _compiled("gpt2", scheme)
    out = slimc.save(q, tmp_path / "auto", format="auto")
    assert (out / "model.pt2").is_file()
    reloaded = slimc.load(out)
    torch.testing.assert_close(_logits(reloaded), _logits(q), rtol=1e-5, atol=1e-5)
    other = torch.randint(0, 128, (3, 9))
    torch.testing.assert_close(_logits(reloaded, other), _logits(q, other), rtol=1e-5, atol=1e-5)


def test_gpt2_compressed_tensors_is_refused_with_the_reason(tmp_path):
    q = _compiled("gpt2", "w8a8-dynamic")
    with pytest.raises(UserError, match=r"transformer\.h\.0\.attn\.c_attn .* is a Conv1D.*pt2"):
        slimc.save(q, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_cli_auto_format_picks_pt2_for_gpt2(capsys):
    from slimc.tools.cli import choose_format

    assert choose_format(_compiled("gpt2", "w8a8-dynamic"), "auto") == "pt2"
    assert "Conv1D" in capsys.readouterr().err
    assert choose_format(_compiled("falcon", "w8a8-dynamic"), "auto") == "compressed-tensors"


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_stays_exact_after_write_back(family: str) -> None:
    model = _float(family)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    calib = [torch.randint(0, 128, (1, 24), generator=g) for g in gens]
    smoothed = slimc.compile(model, "smooth-quant", calib=calib, progress=False)
    assert smoothed.slimc_program.statistics["smooth-quant"]["smoothed norm-linear groups"] > 0
    first = _linear_layers(model)[0]
    before, after = model.get_submodule(first).weight, smoothed.get_submodule(first).weight
    assert after.shape == before.shape and not torch.equal(after, before)  # written back
    assert _rel(_logits(smoothed), _logits(model)) < 1e-4


def test_shared_weight_stays_a_matmul() -> None:
    """An [in, out] weight also read by something else is not transposed (nor rewritten)."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w + self.w.sum(0)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Shared()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    model, x = Outer().eval(), torch.randn(2, 3, 8)
    program = capture(model, (x,))
    assert not program.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
    torch.testing.assert_close(program(x), model(x))


def test_quantizing_nothing_is_an_error_naming_why() -> None:
    mlp, x = tiny_mlp(), torch.randn(2, 4, 64)
    with pytest.raises(UserError, match=r"no linear: all 2 linears are excluded by ignore=fc\*"):
        slimc.compile(mlp, "w8a8-dynamic{ignore=fc*}", example_inputs=(x,), progress=False)
    with pytest.raises(UserError, match=r"excluded by only=nothing and ignore=lm_head"):
        slimc.compile(mlp, "w8a8-dynamic{only=nothing}", example_inputs=(x,), progress=False)

    class NoLinear(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    with pytest.raises(UserError, match="the graph has no aten.linear with a constant weight"):
        slimc.compile(NoLinear(), "w8a8-dynamic", example_inputs=(x,), progress=False)


def test_a_second_quantizer_after_everything_is_quantized_is_fine() -> None:
    mlp, x = tiny_mlp(), torch.randn(2, 4, 64)
    pipeline = 'linear-quant{scheme=w8a16 ignore=""},linear-quant{scheme=w4a16 ignore=""}'
    q = slimc.compile(mlp, pipeline, example_inputs=(x,), progress=False)
    assert {m.scheme.name for m in q.modules() if isinstance(m, QuantizedLinear)} == {"w8a16"}


def test_gpt2_ascend_v1_is_refused_with_the_reason(tmp_path):
    q = _compiled("gpt2", "w8a8-dynamic")
    with pytest.raises(UserError, match=r"AscendV1 describes Linear layers, .* is a Conv1D.*pt2"):
        slimc.save(q, tmp_path / "av1", format="ascend-v1")
