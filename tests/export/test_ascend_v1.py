"""AscendV1 export: description <-> tensors, dtypes and shapes per mode, outputs rebuilt from the files."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import slimc
from slimc.errors import UserError
from slimc.export.ascend_v1 import (
    DESCRIPTION_NAME,
    GLOBAL_KEYS,
    WEIGHTS_NAME,
    AscendV1Checkpoint,
    decode_deq_scale,
    encode_deq_scale,
    load_ascend_v1,
    pack_int4_int8,
    unpack_int4_int8,
)
from slimc.nn import QuantizedLinear
from slimc.quant.scheme import LinearQuantScheme, TensorQuantSpec
from tests.models import tiny_llama, tiny_opt, tiny_tokenizer

CALIB = [
    torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)
]
X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(123))

SCHEMES = {
    "w8a8": "W8A8",
    "w8a8-dynamic": "W8A8_DYNAMIC",
    "w8a16": "W8A16",
    "w8a16{group-size=32 symmetric=false}": "W8A16",
    "w4a16": "W4A16",  # asymmetric per channel
    "w4a16{group-size=32}": "W4A16",
    "w4a16{group-size=32 symmetric=true}": "W4A16",
    "w4a8": "W4A8_DYNAMIC",
    "w4a4": "W4A4_DYNAMIC",
}
LINEAR_KEYS = {
    "W8A8": {"weight", "weight_scale", "weight_offset", "input_scale", "input_offset"}
    | {"deq_scale", "quant_bias"},
    "W8A8_DYNAMIC": {"weight", "weight_scale", "weight_offset"},
    "W8A16": {"weight", "weight_scale", "weight_offset"},
    "W4A16": {"weight", "weight_scale", "weight_offset"},
    "W4A8_DYNAMIC": {"weight", "weight_scale", "weight_offset", "scale_bias"},
    "W4A4_DYNAMIC": {"weight", "weight_scale", "weight_offset"},
}


@pytest.fixture(scope="module")
def float_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def saved(float_model, tmp_path_factory):
    """scheme -> (compiled model, output dir, checkpoint read back), each saved once."""
    cache: dict[str, tuple[nn.Module, Path, AscendV1Checkpoint]] = {}
    root = tmp_path_factory.mktemp("ascend")

    def get(scheme: str, model: nn.Module | None = None):
        key = scheme if model is None else f"{scheme}@{type(model).__name__}"
        if key not in cache:
            q = slimc.compile(model or float_model, scheme, calib=CALIB, progress=False)
            out = slimc.save(q, root / f"m{len(cache)}", format="ascend-v1")
            cache[key] = (q, out, load_ascend_v1(out))
        return cache[key]

    return get


# ------------------------------------------------------------------ encodings


def test_int4_packing_is_two_complement_low_nibble_first():
    q = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    packed = pack_int4_int8(q)
    assert packed.dtype == torch.int8 and packed.shape == (1, 2)
    assert [int(b) & 0xFF for b in packed[0]] == [0xF1, 0x78]
    r = torch.randint(-8, 8, (16, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4_int8(pack_int4_int8(r)), r)


def test_deq_scale_encoding():
    deq = torch.tensor([1.5e-4, 3.25e-2])
    as_int = encode_deq_scale(deq, torch.float16)
    assert as_int.dtype == torch.int64
    assert as_int.tolist() == deq.view(torch.int32).tolist()  # the float32 bits, not truncated
    assert torch.equal(decode_deq_scale(as_int), deq)
    as_float = encode_deq_scale(deq, torch.bfloat16)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, deq)


# ------------------------------------------------------------------ description and tensors


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_description_matches_tensors_and_modes(saved, scheme):
    q, out, ck = saved(scheme)
    description = json.loads((out / DESCRIPTION_NAME).read_text())
    per_tensor = {k: v for k, v in description.items() if k not in GLOBAL_KEYS}
    assert set(per_tensor) == set(ck.tensors)  # every key has a tensor, and the reverse
    mode = SCHEMES[scheme]
    assert description["model_quant_type"] == mode
    assert description["version"] == "1.0.0"
    assert description["group_size"] == _group_of(q)
    assert per_tensor["model.embed_tokens.weight"] == "FLOAT"
    assert per_tensor["model.norm.weight"] == "FLOAT"
    assert per_tensor["model.layers.0.input_layernorm.weight"] == "FLOAT"
    assert "lm_head.weight" not in per_tensor  # tied to the embedding: saved once
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(ck.linears()) == set(quantized)
    for name, mod in quantized.items():
        keys = {k.removeprefix(name + ".") for k in per_tensor if k.startswith(name + ".")}
        assert keys == LINEAR_KEYS[mode]
        assert {per_tensor[f"{name}.{k}"] for k in keys} == {mode}
        _check_shapes(ck, name, mod, mode)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (out / "generation_config.json").is_file() and (out / WEIGHTS_NAME).is_file()


def _group_of(q) -> int:
    sizes = {m.group_size for m in q.modules() if isinstance(m, QuantizedLinear)}
    return max(sizes) if max(sizes) > 0 else 0


def _check_shapes(ck: AscendV1Checkpoint, name: str, mod: QuantizedLinear, mode: str) -> None:
    t = {k.removeprefix(name + "."): v for k, v in ck.tensors.items() if k.startswith(name + ".")}
    n, k = mod.out_features, mod.in_features
    groups = mod.weight_scale.reshape(n, -1).shape[1]
    four = mode.startswith("W4")
    assert t["weight"].dtype == torch.int8
    assert t["weight"].shape == ((n, k // 2) if four else (n, k))
    assert torch.equal(ck.int_weight(name), _slimc_int(mod))
    for key in ("weight_scale", "weight_offset"):
        assert t[key].dtype == torch.float32 and t[key].shape == (n, groups)
    zp = mod.weight_zero_point
    want_offset = torch.zeros(n, groups) if zp is None else zp.float().reshape(n, groups)
    assert torch.equal(t["weight_offset"], want_offset)
    torch.testing.assert_close(
        ck.dequantized_weight(name), mod.dequantized_weight(), rtol=0, atol=0
    )
    if mode == "W8A8":
        assert t["input_scale"].shape == (1,) and t["input_offset"].dtype == torch.float32
        assert t["deq_scale"].dtype == torch.int64 and t["deq_scale"].shape == (n,)  # fp32 model
        assert t["quant_bias"].dtype == torch.int32 and t["quant_bias"].shape == (n,)
        deq = mod.input_scale.float() * mod.weight_scale.float().reshape(-1)
        assert torch.equal(ck.deq_scale(name), deq)
        correction = _slimc_int(mod).to(torch.int64).sum(dim=1) * int(mod.input_zero_point)
        assert torch.equal(t["quant_bias"].to(torch.int64), -correction)  # no float bias here
    if mode == "W4A8_DYNAMIC":
        chunks = 16 if name.endswith(("down_proj", "o_proj")) else 1
        assert t["scale_bias"].shape == (n, chunks)
        total = 8 * mod.dequantized_weight().sum(dim=1)
        torch.testing.assert_close(t["scale_bias"].sum(dim=1), total, rtol=1e-5, atol=1e-5)


def _slimc_int(mod: QuantizedLinear) -> torch.Tensor:
    from slimc.ops import unpack_int4

    return unpack_int4(mod.qweight) if mod.scheme.weight.bits == 4 else mod.qweight


# ------------------------------------------------------------------ outputs from the saved files


class _AscendLinear(nn.Module):
    """The inference math of one AscendV1 mode, from the saved tensors only."""

    def __init__(self, ck: AscendV1Checkpoint, name: str, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.t = {
            k.removeprefix(name + "."): v for k, v in ck.tensors.items() if k.startswith(name + ".")
        }
        self.q = ck.int_weight(name)
        self.w = ck.dequantized_weight(name)
        self.deq = ck.deq_scale(name) if mode == "W8A8" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, xf = self.t, x.to(torch.float32)
        if self.mode == "W8A8":  # (q(x) @ q_w + quant_bias) * deq_scale
            xq = torch.clamp(torch.round(xf / t["input_scale"] + t["input_offset"]), -128, 127)
            acc = torch.round(xq.double() @ self.q.double().t()) + t["quant_bias"].double()
            return (acc.float() * self.deq).to(x.dtype)
        if self.mode.endswith("_DYNAMIC"):  # per-token symmetric activations
            qmax = 7 if self.mode == "W4A4_DYNAMIC" else 127
            s = torch.clamp(xf.abs().amax(dim=-1, keepdim=True) / qmax, min=torch.finfo().eps)
            xf = torch.clamp(torch.round(xf / s), -qmax - 1, qmax) * s
        return nn.functional.linear(xf, self.w, t.get("bias")).to(x.dtype)


def _rebuilt(float_model: nn.Module, ck: AscendV1Checkpoint) -> nn.Module:
    model = copy.deepcopy(float_model)
    floats = {k: v for k, v in ck.tensors.items() if ck.modes[k] == "FLOAT"}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    assert not unexpected
    for name, mode in ck.linears().items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, _AscendLinear(ck, name, mode))
    return model.eval()


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_saved_files_reproduce_the_quantized_model(saved, float_model, scheme):
    q, _, ck = saved(scheme)
    with torch.no_grad():
        want = q(X).logits
        got = _rebuilt(float_model, ck)(X).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_w8a8_with_biases_folds_them_into_quant_bias(saved):
    model = tiny_opt(seed=0, layers=2)
    q, _, ck = saved("w8a8", model)
    name = "model.decoder.layers.0.fc1"
    mod = q.get_submodule(name)
    t = {k.removeprefix(name + "."): v for k, v in ck.tensors.items() if k.startswith(name + ".")}
    deq = ck.deq_scale(name).double()
    correction = _slimc_int(mod).double().sum(dim=1) * float(mod.input_zero_point)
    want = torch.round(mod.bias.double() / deq - correction)
    assert torch.equal(t["quant_bias"].double(), want)
    assert torch.equal(t["bias"], mod.bias.float())
    with torch.no_grad():
        expected = q(X).logits
        got = _rebuilt(model, ck)(X).logits
    # quant_bias rounds the bias to a multiple of deq_scale: half a step per channel at most
    err = (got - expected).abs().max().item()
    assert err < 1e-2 * expected.abs().max().item()


# ------------------------------------------------------------------ errors and files


def test_tokenizer_is_saved(saved, float_model, tmp_path):
    q, _, _ = saved("w8a16")
    out = slimc.save(q, tmp_path / "tok", format="ascend-v1", tokenizer=tiny_tokenizer())
    assert (out / "tokenizer.json").is_file()
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))


def test_quantized_lm_head_unties_the_embedding(float_model, tmp_path):
    pipeline = "linear-quant{scheme=w8a16 ignore=nothing},fuse-quantized-linear"
    q = slimc.compile(float_model, pipeline, progress=False)
    ck = load_ascend_v1(slimc.save(q, tmp_path / "out", format="ascend-v1"))
    assert ck.modes["lm_head.weight"] == "W8A16"
    assert ck.modes["model.embed_tokens.weight"] == "FLOAT"
    assert ck.config is not None and ck.config["tie_word_embeddings"] is False


def test_lowered_model_is_refused(float_model, tmp_path):
    q = slimc.compile(float_model, "w8a16,lower-npu", progress=False)
    with pytest.raises(UserError, match="bound to a kernel by a lowering pass"):
        slimc.save(q, tmp_path / "out", format="ascend-v1")
    assert not (tmp_path / "out").exists()


def test_scheme_without_a_mode_is_refused(tmp_path):
    act = TensorQuantSpec(8, False, "token", dynamic=True)  # asymmetric per-token: no mode
    scheme = LinearQuantScheme("custom", TensorQuantSpec(8, True, "channel"), act)
    q = QuantizedLinear(scheme, 8, 4, torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1))
    with pytest.raises(UserError, match=r"scheme 'custom' .*asymmetric per token.* no AscendV1"):
        slimc.save(nn.Sequential(q), tmp_path / "out", format="ascend-v1")
    assert not (tmp_path / "out").exists()


def test_unquantized_and_mixed_group_sizes_are_refused(float_model, tmp_path):
    with pytest.raises(UserError, match="no quantized linear layers"):
        slimc.save(float_model, tmp_path / "a", format="ascend-v1")
    mixed = (
        "linear-quant{scheme=w4a16 group-size=32 only=*mlp*},"
        "linear-quant{scheme=w8a16 group-size=16},fuse-quantized-linear"
    )
    q = slimc.compile(float_model, mixed, progress=False)
    with pytest.raises(UserError, match=r"one global group_size, the model uses \[16, 32\]"):
        slimc.save(q, tmp_path / "b", format="ascend-v1")
    assert os.listdir(tmp_path) == []


def test_reader_rejects_a_key_without_tensor(saved, tmp_path):
    _, out, _ = saved("w8a16")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / WEIGHTS_NAME).write_bytes((out / WEIGHTS_NAME).read_bytes())
    description = json.loads((out / DESCRIPTION_NAME).read_text())
    description["model.layers.0.mlp.up_proj.input_scale"] = "W8A16"
    (broken / DESCRIPTION_NAME).write_text(json.dumps(description))
    with pytest.raises(UserError, match="no tensor for 'model.layers.0.mlp.up_proj.input_scale'"):
        load_ascend_v1(broken)


# ------------------------------------------------------------------ CLI


def test_cli_quant_format_ascend_v1(tmp_path, capsys):
    from slimc.tools.cli import main

    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "w8a8-dynamic"
    args = ["quant", "--model", str(model_dir), "--quant-type", "w8a8-dynamic"]
    rc = main([*args, "--format", "ascend-v1", "--save", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "saved ascend-v1 model" in captured.err
    ck = load_ascend_v1(out)
    assert ck.description["model_quant_type"] == "W8A8_DYNAMIC"
    assert len(ck.linears()) == 14
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
