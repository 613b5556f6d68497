"""A bf16 model compiles in float32 reading its weights one at a time: same result as its float32 copy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimc
from slimc.evaluate import perplexity
from slimc.nn import QuantizedLinear
from slimc.weight_source import meta_weights, needs_widening, widened_forward
from tests.families import FAMILIES

CALIB = [
    torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)
]
IDS = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(9))


def _bf16(family: str) -> nn.Module:
    return FAMILIES[family]().to(torch.bfloat16)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
        for k, v in m.state_dict().items()
    }


def _assert_same_compile(model: nn.Module, pipeline: str) -> nn.Module:
    """Compile `model` (bf16) and its float32 copy; the programs and quantized layers agree."""
    expected = slimc.compile(copy.deepcopy(model).float(), pipeline, calib=CALIB, progress=False)
    got = slimc.compile(model, pipeline, calib=CALIB, progress=False)
    program = got.slimc_program
    assert program.weight_source is not None
    assert program.graph_module.graph is program.graph
    with torch.inference_mode():
        assert torch.equal(program(IDS), expected.slimc_program(IDS))
    want, have = _quantized_state(expected), _quantized_state(got)
    assert want and want.keys() == have.keys()
    for name, value in want.items():
        assert torch.equal(have[name], value), name
    return got


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt2"])
def test_smoothed_static_w8a8_of_a_bf16_model_equals_its_float32_copy(family: str) -> None:
    model = _bf16(family)
    before = {k: (v.data_ptr(), v.clone()) for k, v in _tensors(model).items()}
    got = _assert_same_compile(model, "smooth-quant,w8a8")
    for name, (ptr, value) in before.items():  # the user's model: untouched, not copied
        t = _tensors(model)[name]
        assert t.data_ptr() == ptr and torch.equal(t, value), name
    assert all(p.dtype == torch.bfloat16 for p in got.parameters() if p.is_floating_point())


@pytest.mark.parametrize(
    "pipeline",
    [
        "w8a8-dynamic",
        "gptq{scheme=w4a16 group-size=16}",
        "quarot,w8a8",
        "awq,w4a16",
        "autoround{scheme=w4a16 iters=4}",
    ],
)
def test_llama_pipelines_of_a_bf16_model_equal_their_float32_copy(pipeline: str) -> None:
    _assert_same_compile(_bf16("llama"), pipeline)


def test_unwritten_weights_stay_in_the_source() -> None:
    model = _bf16("llama")
    got = slimc.compile(model, "w8a8-dynamic", progress=False)
    store = got.slimc_program.weights
    norm = "model.norm.weight"
    assert norm in store and not store.is_written(norm)
    assert store.get(norm).dtype == torch.float32
    assert store.get(norm) is not store.get(norm)  # a new widened copy each time
    assert sum(store.is_written(n) for n in store.names()) < len(store.names())
    # the returned model shares the float weights nobody changed with the user's model
    assert got.model.norm.weight is model.model.norm.weight
    assert got.lm_head.weight is model.lm_head.weight


def test_compute_dtype_none_keeps_the_models_dtype() -> None:
    model = _bf16("llama")
    got = slimc.compile(model, "w8a8-dynamic", progress=False, compute_dtype=None)
    assert got.slimc_program.weight_source is None
    assert not needs_widening(FAMILIES["llama"](), torch.float32)


def test_meta_weights_restores_the_model_and_names_tied_weights() -> None:
    model = _bf16("llama")  # ties lm_head to the embedding
    tensors = _tensors(model)
    with meta_weights(model, torch.float32) as source:
        assert model.lm_head.weight.is_meta and model.lm_head.weight.dtype == torch.float32
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in source and "model.embed_tokens.weight" in source
    assert source.read("lm_head.weight", torch.float32).dtype == torch.float32
    for name, t in _tensors(model).items():
        assert t is tensors[name], name


@pytest.mark.parametrize("family", ["gemma2", "opt"])
def test_widened_forward_evaluates_a_bf16_model_as_its_float32_copy(family: str) -> None:
    model = _bf16(family)
    ids = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(1))
    fp32 = perplexity(copy.deepcopy(model).float(), ids, windows=2, seqlen=64, progress=False)
    wide = perplexity(model, ids, windows=2, seqlen=64, progress=False, compute_dtype=torch.float32)
    narrow = perplexity(model, ids, windows=2, seqlen=64, progress=False)
    assert wide.ppl == fp32.ppl
    assert narrow.ppl != fp32.ppl
    with widened_forward(model, torch.float32):
        pass
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_slimc_quant_of_a_bf16_checkpoint_reports_its_float32_figures(tmp_path, capsys) -> None:
    """The bf16 checkpoint loads as bf16 and gives the PPL rows of the same weights in float32."""
    from transformers import AutoModelForCausalLM

    from slimc.tools.cli import main
    from tests.models import tiny_tokenizer

    model = _bf16("llama")
    dirs = {"bf16": tmp_path / "bf16", "fp32": tmp_path / "fp32"}
    model.save_pretrained(dirs["bf16"])
    copy.deepcopy(model).float().save_pretrained(dirs["fp32"])
    rows = {}
    for kind, path in dirs.items():
        tiny_tokenizer().save_pretrained(path)
        out = tmp_path / f"{kind}-w8a8"
        argv = ["quant", "--model", str(path), "--quant-type", "w8a8", "--calib-samples", "4"]
        assert main([*argv, "--eval", "1", "--save", str(out)]) == 0
        printed = capsys.readouterr().out.splitlines()
        rows[kind] = [line.split()[:2] for line in printed if line.startswith(("fp32", "w8a8"))]
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        expected = {"bf16": torch.bfloat16, "fp32": torch.float32}[kind]
        assert reloaded.model.norm.weight.dtype == expected  # the checkpoint's dtype is kept
    assert len(rows["bf16"]) == 2 and rows["bf16"] == rows["fp32"]


def test_calibration_gathers_embedding_rows_without_widening_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from slimc.weight_source import WeightSource

    widened: list[str] = []
    read = WeightSource.read

    def spy(self: WeightSource, name: str, dtype: torch.dtype) -> torch.Tensor:
        widened.append(name)
        return read(self, name, dtype)

    model = _bf16("llama")  # tied: the table is also lm_head, outside the layers calibrated
    monkeypatch.setattr(WeightSource, "read", spy)
    slimc.compile(model, "w8a8", calib=CALIB, progress=False)
    monkeypatch.undo()
    _assert_same_compile(model, "w8a8")
    assert "model.layers.0.mlp.up_proj.weight" in widened
    assert not {"lm_head.weight", "model.embed_tokens.weight"} & set(widened)
