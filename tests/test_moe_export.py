"""compressed-tensors and AscendV1 checkpoints of quantized MoE models: one linear per expert
under the original checkpoint's names, which transformers' own loader maps back onto its expert
stacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import slimc
from slimc.errors import UserError
from slimc.export.ascend_v1 import DESCRIPTION_NAME, GLOBAL_KEYS, load_ascend_v1
from slimc.tools.cli import main
from tests.models import tiny_tokenizer
from tests.test_moe_capture import IDS, _logits, tiny_moe


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _dequantized(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The float checkpoint the compressed one encodes: each quantized linear's weight rebuilt
    from its integers, scales and zero points (compressed-tensors' int32 packing undone)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    linears = {k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")}
    out = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in linears}
    for name in linears:
        scale = tensors[f"{name}.weight_scale"].float()
        if f"{name}.weight_packed" in tensors:
            shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
            q = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, shape).float()
        else:
            q = tensors[f"{name}.weight"].float()
        zero = tensors.get(f"{name}.weight_zero_point")
        if zero is not None and zero.dtype == torch.int32:
            zero = unpack_from_int32(zero, bits, scale.shape, packed_dim=0)
        rows, cols = q.shape
        groups = scale.shape[1]
        grouped = q.reshape(rows, groups, cols // groups)
        offset = 0.0 if zero is None else zero.float().reshape(rows, groups, 1)
        weight = (grouped - offset) * scale.reshape(rows, groups, 1)
        out[f"{name}.weight"] = weight.reshape(rows, cols)
        if f"{name}.bias" in tensors:
            out[f"{name}.bias"] = tensors[f"{name}.bias"]
    return out


def _reload_dequantized(saved: Path, into: Path, bits: int) -> torch.nn.Module:
    """transformers' model from the dequantized checkpoint (its experts fused by its loader)."""
    config = json.loads((saved / "config.json").read_text())
    config.pop("quantization_config")
    into.mkdir()
    (into / "config.json").write_text(json.dumps(config))
    tensors = _dequantized(_tensors(saved), bits)
    save_file(tensors, str(into / "model.safetensors"), metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(into, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["Qwen3Moe", "Mixtral", "DeepseekV3", "Qwen2Moe"])
def test_each_expert_is_written_as_the_linear_the_original_checkpoint_names(
    family: str, tmp_path: Path
) -> None:
    quantized = slimc.compile(tiny_moe(family), "w4a16{group-size=32}", progress=False)
    slimc.save(quantized, tmp_path / "ct", format="compressed-tensors")
    qconfig = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    tensors = _tensors(tmp_path / "ct")
    assert not any(".quantized." in k or k.endswith("gate_up_proj") for k in tensors)
    per_expert = (
        "block_sparse_moe.experts.{e}.w1" if family == "Mixtral" else "mlp.experts.{e}.gate_proj"
    )
    layer = 1 if family == "DeepseekV3" else 0  # its first layer is dense
    for e in range(8):  # int4 codes packed in int32 words, as vLLM reads them
        packed = tensors[f"model.layers.{layer}.{per_expert.format(e=e)}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape[1] == 64 // 8
    routers = [n for n in qconfig["ignore"] if n.endswith(".gate")]
    assert len(routers) == (1 if family == "DeepseekV3" else 2)  # routers stay float
    if family == "Qwen2Moe":  # and so does the one-output shared-expert gate
        assert "model.layers.0.mlp.shared_expert_gate" in qconfig["ignore"]
        assert "model.layers.0.mlp.shared_expert_gate.weight" in tensors
    reloaded = _reload_dequantized(tmp_path / "ct", tmp_path / "float", bits=4)
    with torch.no_grad():
        got, want = reloaded(IDS).logits, _logits(quantized(IDS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_int8_experts_with_static_inputs_share_the_stack_input_scale(tmp_path: Path) -> None:
    model = tiny_moe("Qwen3Moe")
    quantized = slimc.compile(model, "w8a8", calib=[IDS[:1], IDS[1:]], progress=False)
    slimc.save(quantized, tmp_path / "ct", format="compressed-tensors")
    tensors = _tensors(tmp_path / "ct")
    stack = quantized.get_submodule("model.layers.0.mlp.experts").quantized["gate_up_proj"]
    for e in (0, 5):
        gate = f"model.layers.0.mlp.experts.{e}.gate_proj"
        up = f"model.layers.0.mlp.experts.{e}.up_proj"
        assert tensors[f"{gate}.weight"].dtype == torch.int8
        rows = stack[e].qweight.shape[0] // 2  # gate rows first, then up
        assert torch.equal(tensors[f"{gate}.weight"], stack[e].qweight[:rows])
        assert torch.equal(tensors[f"{up}.weight"], stack[e].qweight[rows:])
        assert torch.equal(tensors[f"{gate}.input_scale"], tensors[f"{up}.input_scale"])
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["input_activations"]["dynamic"] is False


@pytest.mark.parametrize("family", ["GptOss", "GraniteMoe"])
def test_experts_kept_fused_on_disk_are_refused_and_auto_saves_pt2(
    family: str, tmp_path: Path
) -> None:
    quantized = slimc.compile(tiny_moe(family), "w4a16{group-size=32}", progress=False)
    with pytest.raises(UserError, match="pt2") as info:
        slimc.save(quantized, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
    assert "\n" not in str(info.value) and "experts" in str(info.value)
    assert slimc.export.resolve_format(quantized, "auto") == "pt2"


def test_cli_saves_pt2_by_default_and_the_per_expert_layouts_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = tmp_path / "moe"
    tiny_moe("Qwen3Moe").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    args = ["quant", "--model", str(model_dir), "--quant-type", "w8a8-dynamic", "--save"]
    assert main([*args, str(tmp_path / "auto")]) == 0
    assert "saving as pt2: transformers cannot load" in capsys.readouterr().err
    assert (tmp_path / "auto" / "model.pt2").is_file()
    with torch.no_grad():  # pt2 runs again through slimc.load
        assert _logits(slimc.load(tmp_path / "auto")(IDS)).shape == (2, 12, 128)
    assert main([*args, str(tmp_path / "ascend"), "--format", "ascend-v1"]) == 0
    description = json.loads((tmp_path / "ascend" / DESCRIPTION_NAME).read_text())
    assert description["model.layers.1.mlp.experts.7.down_proj.weight"] == "W8A8_DYNAMIC"
    assert main([*args, str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
    assert "one linear per expert, the layout vLLM reads" in caplog.text
    names = set(_tensors(tmp_path / "ct"))
    assert "model.layers.1.mlp.experts.7.down_proj.weight_scale" in names
    with pytest.raises(UserError, match="one linear per expert .* --format pt2"):
        slimc.load(tmp_path / "ct")  # a clear refusal, not transformers' conversion report
    assert main(["eval", "--model", str(tmp_path / "ct"), "--windows", "1"]) != 0
    assert (tmp_path / "ct" / "tokenizer_config.json").is_file()


def _reload_ascend(saved: Path, into: Path) -> torch.nn.Module:
    """transformers' model from an AscendV1 directory's float and dequantized weights."""
    checkpoint = load_ascend_v1(saved)
    tensors = {k: v for k, v in checkpoint.tensors.items() if checkpoint.modes[k] == "FLOAT"}
    for name in checkpoint.linears():
        tensors[f"{name}.weight"] = checkpoint.dequantized_weight(name)
    into.mkdir()
    (into / "config.json").write_text((saved / "config.json").read_text())
    save_file(tensors, str(into / "model.safetensors"), metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(into, dtype=torch.float32).eval()


def test_ascend_v1_writes_each_expert_with_its_mode_tags(tmp_path: Path) -> None:
    static = slimc.compile(tiny_moe("Qwen3Moe"), "w8a8", calib=[IDS[:1], IDS[1:]], progress=False)
    slimc.save(static, tmp_path / "w8a8", format="ascend-v1")
    checkpoint = load_ascend_v1(tmp_path / "w8a8")
    description = json.loads((tmp_path / "w8a8" / DESCRIPTION_NAME).read_text())
    per_tensor = {k: v for k, v in description.items() if k not in GLOBAL_KEYS}
    assert set(per_tensor) == set(checkpoint.tensors)  # one-to-one
    assert per_tensor["model.layers.0.mlp.gate.weight"] == "FLOAT"  # the router
    stack = static.get_submodule("model.layers.0.mlp.experts").quantized["gate_up_proj"]
    rows = stack[3].out_features // 2
    for name, part in (("gate_proj", slice(0, rows)), ("up_proj", slice(rows, None))):
        linear = f"model.layers.0.mlp.experts.3.{name}"
        assert per_tensor[f"{linear}.weight"] == per_tensor[f"{linear}.deq_scale"] == "W8A8"
        want = stack[3].dequantized_weight()[part]
        torch.testing.assert_close(checkpoint.dequantized_weight(linear), want, rtol=0, atol=0)
        deq = stack[3].input_scale.float() * stack[3].weight_scale.float().reshape(-1)[part]
        assert torch.equal(checkpoint.deq_scale(linear), deq)
    weight_only = slimc.compile(tiny_moe("Mixtral"), "w8a16", progress=False)
    slimc.save(weight_only, tmp_path / "w8a16", format="ascend-v1")
    assert (
        "model.layers.1.block_sparse_moe.experts.7.w2"
        in load_ascend_v1(tmp_path / "w8a16").linears()
    )
    reloaded = _reload_ascend(tmp_path / "w8a16", tmp_path / "float")
    with torch.no_grad():
        got, want = reloaded(IDS).logits, _logits(weight_only(IDS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_expert_stack_left_float_is_written_per_expert_and_ignored(tmp_path: Path) -> None:
    pipeline = "w4a16{group-size=32 ignore=lm_head,*experts.down_proj}"
    quantized = slimc.compile(tiny_moe("Qwen3Moe"), pipeline, progress=False)
    slimc.save(quantized, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    downs = [f"model.layers.{i}.mlp.experts.{e}.down_proj" for i in range(2) for e in range(8)]
    assert set(config["ignore"]) == {
        *downs,
        "lm_head",
        "model.layers.0.mlp.gate",
        "model.layers.1.mlp.gate",
    }
    tensors = _tensors(tmp_path / "ct")
    assert tensors[f"{downs[3]}.weight"].dtype == torch.float32
    assert f"{downs[3]}.weight_scale" not in tensors
    reloaded = _reload_dequantized(tmp_path / "ct", tmp_path / "float", bits=4)
    with torch.no_grad():
        got, want = reloaded(IDS).logits, _logits(quantized(IDS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
