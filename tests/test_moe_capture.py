"""Mixture-of-experts decoders: every MoE family transformers ships captures exactly, and the
linear quantizers leave routers in float."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import transformers

import slimc
from slimc.analyses.experts import Experts
from slimc.analyses.linear_groups import LinearGroups
from slimc.analyses.residual_stream import ResidualStream
from slimc.capture import capture
from slimc.ir.builder import is_constant
from slimc.linear_select import moe_routers
from slimc.program import node_loc

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
# fmt: off
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "Qwen3Moe": ("Qwen3Moe", dict(moe_intermediate_size=32, num_experts=8, head_dim=16)),
    "Qwen2Moe": (
        "Qwen2Moe",
        dict(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8),
    ),
    "Mixtral": ("Mixtral", dict(num_local_experts=8)),
    "Olmoe": ("Olmoe", dict(num_experts=8)),
    "GptOss": ("GptOss", dict(num_local_experts=8, head_dim=16)),
    "Phimoe": ("Phimoe", dict(num_local_experts=8)),
    "GraniteMoe": ("GraniteMoe", dict(num_local_experts=8)),
    "Glm4Moe": (
        "Glm4Moe",
        dict(moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, head_dim=16,
             first_k_dense_replace=1),
    ),  # fmt: skip
    "DeepseekV3": (
        "DeepseekV3",
        dict(moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, q_lora_rank=32,
             first_k_dense_replace=1, n_group=2, topk_group=1, num_key_value_heads=4, **MLA),
    ),  # fmt: skip
    "DeepseekV2": (
        "DeepseekV2",
        dict(moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, q_lora_rank=None,
             first_k_dense_replace=1, num_key_value_heads=4, **MLA),
    ),  # fmt: skip
}
# fmt: on


SHARED = ("Qwen2Moe", "Glm4Moe", "DeepseekV3", "DeepseekV2")
"""The families with shared experts beside the routed ones."""


def tiny_moe(family: str, seed: int = 0) -> torch.nn.Module:
    prefix, extra = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(
        **{**COMMON, "num_experts_per_tok": 2, **extra}
    )
    torch.manual_seed(seed)
    return getattr(transformers, f"{prefix}ForCausalLM")(config).eval()


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_family_captures_exactly_with_one_router_per_moe_layer(family: str) -> None:
    model = tiny_moe(family)
    program = capture(model)
    with torch.no_grad():
        want = model(IDS).logits
        got = _logits(program(IDS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer = re.compile(r"model\.layers\.\d+")
    moe_layers = {
        layer.match(name).group(0)  # type: ignore[union-attr]
        for name, p in model.named_parameters()
        if p.dim() == 3
    }
    routers = [layer.match(node_loc(n) or "") for n in moe_routers(program)]
    assert moe_layers and sorted(m.group(0) for m in routers if m) == sorted(moe_layers)
    # the dispatch is in canonical form: no per-token gather of expert weights is left
    experts = program.graph.find_nodes(
        op="call_function", target=torch.ops.slimc.expert_linear.default
    )
    assert len(experts) == 2 * len(moe_layers)
    gathers = program.graph.find_nodes(op="call_function", target=torch.ops.aten.index.Tensor)
    assert not [g for g in gathers if is_constant(g.args[0])]
    # the experts analysis names each block's router, top-k, products and shared experts
    found = Experts.compute(program).layers
    assert sorted(f"{b.path.rpartition('.')[0]}" for b in found) == sorted(moe_layers)
    for block in found:
        assert block.router is not None and block.router in moe_routers(program)
        assert (block.experts, block.top_k, len(block.up), len(block.down)) == (8, 2, 1, 1)
        assert str(block.up[0].args[1].target).endswith("experts.gate_up_proj")
        assert str(block.down[0].args[1].target).endswith("experts.down_proj")
        shared = {node_loc(n).rpartition(".")[2] for n in block.shared}
        want = {"gate_proj", "up_proj", "down_proj"} if family in SHARED else set()
        assert shared - {"shared_expert_gate"} == want


def test_linear_quant_leaves_routers_float() -> None:
    model = tiny_moe("Qwen3Moe")
    quantized = slimc.compile(model, "w8a8-dynamic", progress=False)
    program = quantized.slimc_program
    router_paths = {node_loc(n) for n in moe_routers(program)}
    assert router_paths == {f"model.layers.{i}.mlp.gate" for i in range(2)}  # still float
    stats = program.statistics["linear-quant"]
    assert stats["quantized linears (w8a8-dynamic)"] == 8  # attention; the routers stay float
    assert stats["quantized expert stacks (w8a8-dynamic)"] == 4
    with torch.no_grad():
        err = (_logits(quantized(IDS)) - model(IDS).logits).abs().max()
    assert 0 < float(err) < 0.1


@pytest.mark.parametrize(
    ("family", "pipeline"),
    [
        *[
            (f, p)
            for f in ("Qwen3Moe", "GptOss", "DeepseekV3")
            for p in ("smooth-quant", "iter-smooth")
        ],
        ("Qwen2Moe", "iter-smooth{shift=true}"),
        ("Qwen3Moe", "flex-smooth-quant"),
        ("Qwen3Moe", "awq"),
    ],
)
def test_smoothing_a_moe_model_folds_into_router_and_experts_exactly(
    family: str, pipeline: str
) -> None:
    model = tiny_moe(family)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    calib = [IDS[:1], IDS[1:]]
    smoothed = slimc.compile(model, pipeline, calib=calib, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(_logits(smoothed(IDS)), model(IDS).logits, rtol=1e-4, atol=1e-4)
    groups = LinearGroups.compute(smoothed.slimc_program).groups
    moe_groups = [g for g in groups if g.reads_experts]
    layers = Experts.compute(smoothed.slimc_program).layers
    assert len(moe_groups) == len(layers)  # one group per block: its norm -> router + experts
    for group, block in zip(moe_groups, layers, strict=True):
        assert block.router in group.targets and set(block.up) <= set(group.targets)
    changed = [n for n, p in smoothed.named_parameters() if "experts.gate_up_proj" in n
               and n in original and not torch.equal(p, original[n])]  # fmt: skip
    assert changed or pipeline == "awq"  # awq keeps a group unscaled when ratio 0 wins


def test_capture_gives_the_model_back_with_its_own_implementations() -> None:
    model = tiny_moe("Qwen3Moe")
    model.set_attn_implementation("eager")
    experts = model.get_experts_implementation()
    assert experts == {"": "grouped_mm"}
    program = capture(model)  # captured through sdpa and batched_mm
    assert program.graph.find_nodes(
        op="call_function", target=torch.ops.slimc.expert_linear.default
    )
    assert model.config._attn_implementation == "eager"
    assert model.get_experts_implementation() == experts


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quarot_rotates_every_expert_like_an_ffn_exactly(family: str) -> None:
    model = tiny_moe(family)
    with torch.no_grad():
        want = model(IDS).logits
    rotated = slimc.compile(model, "quarot", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(rotated(IDS).logits, want, rtol=1e-4, atol=1e-4)
    program = rotated.slimc_program
    stream = ResidualStream.compute(program)
    stacks = [n for n in program.graph.nodes if n.target is torch.ops.slimc.expert_linear.default]
    ups = [n for n in stacks if n in stream.readers]  # read the normed stream: columns rotate
    downs = [n for n in stacks if n in stream.writers]  # add into the stream: rows rotate
    assert len(ups) == len(downs) == len(stacks) // 2 > 0
    for name, param in rotated.named_parameters():  # the stacks written back were rotated
        if param.dim() == 3:
            assert not torch.equal(param, dict(model.named_parameters())[name]), name


@pytest.mark.parametrize("family", ["Qwen3Moe", "GptOss", "DeepseekV3"])
def test_adapt_rotation_fits_on_expert_stack_inputs_exactly(family: str) -> None:
    model = tiny_moe(family)
    with torch.no_grad():
        want = model(IDS).logits
    calib = [IDS[:1], IDS[1:]]
    rotated = slimc.compile(model, "adapt-rotation{steps=3}", calib=calib, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(rotated(IDS).logits, want, rtol=1e-4, atol=1e-4)
    program = rotated.slimc_program
    fitted = program.statistics["adapt-rotation"]["fitted linears"]  # gate_up_proj by default
    stacks = [n for n in program.graph.nodes if n.target is torch.ops.slimc.expert_linear.default]
    assert fitted >= len(stacks) // 2 > 0  # every up stack (and dense up_proj layers)
