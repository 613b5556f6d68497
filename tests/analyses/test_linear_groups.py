"""LinearGroups: the four group kinds on real decoders, norm variants, and exact refusals."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from slimc.analyses.linear_groups import LinearGroups
from slimc.program import Program, node_loc
from slimc.smooth.fold import fold_scale
from tests.analyses.groups import HEAD_DIM, HEADS, KV_HEADS, gqa_map, groups_of, summary
from tests.models import captured, tiny_llama


@pytest.fixture
def programs() -> Callable[[str], Program]:
    """`programs(name)`: a fresh copy of the captured tiny model (captured once per session)."""
    return captured


# -- decoders ------------------------------------------------------------------------------------
def test_llama_four_kinds_per_layer(programs) -> None:
    found = LinearGroups.compute(programs("llama"))
    expected = []
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        expected += [
            (
                "norm-linear",
                f"model.layers.{i}.input_layernorm",
                (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"),
            ),
            ("ov", f"{attn}.v_proj", (f"{attn}.o_proj",)),
            (
                "norm-linear",
                f"model.layers.{i}.post_attention_layernorm",
                (f"{mlp}.gate_proj", f"{mlp}.up_proj"),
            ),
            ("up-down", f"{mlp}.up_proj", (f"{mlp}.down_proj",)),
        ]
    assert sorted(summary(found.groups)) == sorted(expected)
    # in_layer_order: layer by layer, inside a layer up-down, ov, linear-linear, norm-linear
    kinds = [g.kind for g in found.in_layer_order()]
    assert kinds == ["up-down", "ov", "norm-linear", "norm-linear"] * 2
    assert [g.layer for g in found.in_layer_order()] == ["model.layers.0"] * 4 + [
        "model.layers.1"
    ] * 4


def test_llama_channel_maps(programs) -> None:
    found = LinearGroups.compute(programs("llama"))
    ov = [g for g in found.groups if g.kind == "ov"]
    up_down = [g for g in found.groups if g.kind == "up-down"]
    assert len(ov) == 2 and len(up_down) == 2
    for g in ov:
        assert g.source_channels() == KV_HEADS * HEAD_DIM and g.channels == HEADS * HEAD_DIM
        assert g.channel_map is not None
        assert torch.equal(g.channel_map, gqa_map())
        # reduce / expand go through the map: v channel 0 feeds o channels 0 and 16 (heads 0, 1)
        per_input = torch.arange(64, dtype=torch.float64)
        reduced = g.reduce(per_input, "mean")
        assert reduced.shape == (32,) and reduced[0] == 8.0 and reduced[16] == 40.0
        assert g.reduce(per_input, "max")[0] == 16.0
        assert torch.equal(g.expand(reduced)[[0, 16, 32, 48]], reduced[[0, 0, 16, 16]])
    for g in up_down:
        assert g.channel_map is not None
        assert torch.equal(g.channel_map, torch.arange(128))


def test_gqa_map_matches_the_hf_attention_layout() -> None:
    """Independent of the graph: feed channel ids out of v_proj in eager HF and read o_proj."""
    model = tiny_llama(seed=0, layers=1)
    attn = model.model.layers[0].self_attn
    seen: list[torch.Tensor] = []

    def ids(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return torch.arange(1, out.shape[-1] + 1, dtype=out.dtype).expand(out.shape).clone()

    hooks = [
        attn.v_proj.register_forward_hook(ids),
        attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())),
    ]
    try:
        with torch.no_grad():
            model(torch.randint(0, 128, (1, 6)))
    finally:
        for h in hooks:
            h.remove()
    got = seen[0].reshape(-1, seen[0].shape[-1])
    assert torch.allclose(got, (gqa_map() + 1).to(got.dtype).expand_as(got), atol=1e-4)


def test_gemma2_one_plus_w_and_sandwich_norms(programs) -> None:
    found = LinearGroups.compute(programs("gemma2"))
    norm_linear = [g for g in found.groups if g.kind == "norm-linear"]
    carriers = sorted(node_loc(g.carrier.node) for g in norm_linear)  # type: ignore[union-attr]
    assert carriers == [
        f"model.layers.{i}.{n}"
        for i in range(2)
        for n in ("input_layernorm", "pre_feedforward_layernorm")
    ]
    for g in norm_linear:
        assert g.carrier is not None
        assert g.carrier.offset == 1.0  # x * (1 + w)
        assert g.carrier.bias is None
        assert str(g.carrier.weight.target).endswith(
            ("input_layernorm.weight", "pre_feedforward_layernorm.weight")
        )
    # post-sublayer (sandwich) norms feed the residual, never a linear: not carriers
    for g in found.groups:
        src = g.carrier.node if g.carrier is not None else g.producer
        assert "post_" not in (node_loc(src) or "")  # type: ignore[arg-type]
    kinds = sorted(g.kind for g in found.groups)
    assert kinds == ["norm-linear"] * 4 + ["ov"] * 2 + ["up-down"] * 2
    ov = [g for g in found.groups if g.kind == "ov"]
    assert all(torch.equal(g.channel_map, gqa_map()) for g in ov)  # type: ignore[arg-type]
    # the final norm -> lm_head would scale the embedding tied to lm_head: refused, named
    (tied,) = found.refused
    assert tied.kind == "norm-linear" and "lm_head.weight" in tied.reason
    assert "tied" in tied.reason and "embedding" in tied.reason


def test_layer_norm_with_bias_carrier(programs) -> None:
    found = LinearGroups.compute(programs("opt"))
    prefix = "model.decoder.layers"
    assert sorted(summary(found.groups)) == sorted(
        [
            (
                "norm-linear",
                f"{prefix}.{i}.self_attn_layer_norm",
                tuple(f"{prefix}.{i}.self_attn.{p}_proj" for p in "qkv"),
            )
            for i in range(2)
        ]
        + [
            ("ov", f"{prefix}.{i}.self_attn.v_proj", (f"{prefix}.{i}.self_attn.out_proj",))
            for i in range(2)
        ]
        + [
            ("norm-linear", f"{prefix}.{i}.final_layer_norm", (f"{prefix}.{i}.fc1",))
            for i in range(2)
        ]
    )
    for g in found.groups:
        if g.kind == "norm-linear":
            c = g.carrier
            assert c is not None and c.node.target is torch.ops.aten.layer_norm.default
            assert c.offset == 0.0 and c.bias is not None
            name = node_loc(c.node)
            assert c.weight.target == f"{name}.weight" and c.bias.target == f"{name}.bias"
        else:  # MHA: the identity map
            assert torch.equal(g.channel_map, torch.arange(64))  # type: ignore[arg-type]
    # the tied lm_head, behind the final LayerNorm and the logits slice, is refused
    assert len(found.refused) == 1 and "lm_head.weight" in found.refused[0].reason


def test_describe_lists_groups_and_refusals(programs) -> None:
    text = LinearGroups.compute(programs("llama")).describe()
    lines = text.splitlines()
    assert lines[0] == "linear-groups: 8 groups, 1 refused"
    assert "  norm-linear model.layers.0.input_layernorm -> q_proj,k_proj,v_proj" in lines
    assert "  ov model.layers.1.self_attn.v_proj -> o_proj  [32 -> 64 channels]" in lines
    assert "  up-down model.layers.0.mlp.up_proj -> down_proj" in lines
    assert lines[-1].startswith("  refused norm-linear at ")
    assert "weight lm_head.weight of " in lines[-1] and "(tied weights)" in lines[-1]


# -- small modules: refusals and chains -----------------------------------------------------------
class NormAlsoResidual(nn.Module):
    """The norm's output is read by a linear and added to the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.fc(h) + h


class TiedHead(nn.Module):
    """embedding -> LayerNorm -> head, the head's weight tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids)))


class SharedNormWeight(nn.Module):
    """Two norms sharing one weight: scaling it for one would scale the other."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(16)
        self.norm2 = nn.RMSNorm(16)
        self.norm2.weight = self.norm1.weight
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc1(self.norm1(x))
        return h + self.fc2(self.norm2(h))


class Gelu(nn.Module):
    """A GELU module between two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Chain(nn.Module):
    """Linear -> reshape/view -> Linear, channels untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return self.fc2(self.fc1(x).reshape(b * s, 32).view(b, s, 32))


class ChainMixing(nn.Module):
    """Linear -> view splitting the channels in two -> Linear: channel c and c + 16 merge."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return self.fc2(self.fc1(x).view(b, s, 2, 16))


class SelfGated(nn.Module):
    """h * sigmoid(h): both factors depend on the producer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(h))


def names(program: Program, target: object) -> set[str]:
    return {n.name for n in program.graph.find_nodes(op="call_function", target=target)}


def test_refuses_norm_output_read_by_the_residual() -> None:
    found, program = groups_of(NormAlsoResidual())
    assert found.groups == []
    (r,) = found.refused
    assert r.kind == "norm-linear"
    (add,) = names(program, torch.ops.aten.add.Tensor)
    # named by module paths (graph names only where a node has none: the root's add)
    assert r.nodes == ("norm", "fc")
    assert r.reason == f"the scaled value is also read by aten.add ({add})"
    assert str(r) == f"norm-linear at norm -> fc: {r.reason}"


def test_refuses_a_weight_tied_to_an_embedding() -> None:
    found, program = groups_of(TiedHead(), torch.randint(0, 32, (2, 5)))
    assert found.groups == []
    (r,) = found.refused
    assert r.nodes == ("norm", "head")
    assert r.reason == (
        "weight head.weight of head is shared with aten.embedding in emb (tied weights)"
    )


def test_refuses_a_norm_weight_shared_by_two_norms() -> None:
    found, program = groups_of(SharedNormWeight())
    assert found.groups == []
    assert len(found.refused) == 2
    (weight,) = [n for n in program.graph.find_nodes(op="get_attr") if len(n.users) == 2]
    assert [r.nodes for r in found.refused] == [("norm1", "fc1"), ("norm2", "fc2")]
    for r in found.refused:
        assert r.kind == "norm-linear"
        assert r.reason == (
            f"constant {weight.target} is shared by 2 nodes: "
            "aten.rms_norm in norm1, aten.rms_norm in norm2"
        )


def test_nonlinear_op_between_linears_is_not_a_group() -> None:
    found, _ = groups_of(Gelu())
    assert found.groups == [] and found.refused == []


def test_both_factors_depending_on_the_producer_is_refused() -> None:
    found, program = groups_of(SelfGated())
    assert found.groups == []
    (r,) = found.refused
    (sigmoid,) = names(program, torch.ops.aten.sigmoid.default)
    assert r.nodes == ("fc1", "fc2")
    assert r.reason == f"values also read by aten.sigmoid ({sigmoid})"


def test_linear_linear_chain_through_views() -> None:
    found, program = groups_of(Chain())
    (g,) = found.groups
    assert g.kind == "linear-linear"
    assert summary([g]) == [("linear-linear", "fc1", ("fc2",))]
    assert torch.equal(g.channel_map, torch.arange(32))  # type: ignore[arg-type]
    assert found.refused == []


def test_linear_linear_chain_mixing_channels_is_refused() -> None:
    found, program = groups_of(ChainMixing())
    assert found.groups == []
    (r,) = found.refused
    assert r.kind == "linear-linear"
    assert r.reason == "the path between producer and consumer mixes channels"
    assert r.nodes == ("fc1", "fc2")


class LastTokenHead(nn.Module):
    """norm -> hidden[:, -2:, :] -> head: the final norm of a decoder and its untied lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x)[:, -2:, :])


class ScaledChain(nn.Module):
    """fc1 -> times a per-channel constant (layer scale), times a scalar -> fc2: linear-linear.

    (Without the scalar the layer scale itself would carry the scale: a norm-linear group.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.gamma = nn.Parameter(torch.rand(32) + 0.5)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gamma * 0.5)


def test_norm_linear_through_a_sequence_slice() -> None:
    found, program = groups_of(LastTokenHead())
    (g,) = found.groups
    assert summary([g]) == [("norm-linear", "norm", ("head",))]
    assert g.carrier is not None and g.carrier.bias is not None
    x = torch.randn(2, 5, 16)
    ref = program(x)
    fold_scale(program, g, torch.rand(16, dtype=torch.float64) * 4 + 0.25)
    assert torch.allclose(program(x), ref, rtol=1e-5, atol=1e-6)


def test_constant_factors_keep_a_linear_linear_chain() -> None:
    found, program = groups_of(ScaledChain())
    (g,) = found.groups
    assert g.kind == "linear-linear" and torch.equal(g.channel_map, torch.arange(32))  # type: ignore[arg-type]
    x = torch.randn(2, 5, 16)
    ref = program(x)
    fold_scale(program, g, torch.rand(32, dtype=torch.float64) * 4 + 0.25)
    assert torch.allclose(program(x), ref, rtol=1e-5, atol=1e-6)
