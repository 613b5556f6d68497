"""LinearGroups on fused projections (parts of one linear's output) and weightless norms."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from slimc.analyses.linear_groups import LinearGroup, LinearGroups
from slimc.capture import capture
from slimc.program import Program, node_loc
from slimc.smooth.fold import fold_scale
from tests.analyses.groups import HEAD_DIM, HEADS, KV_HEADS, gqa_map, groups_of, summary
from tests.models import captured, float_logits, rel_err
from tests.smooth.fused_models import captured_family

GRAPH_NAME = re.compile(r"\b(linear|slice|getitem|view|mul|add|chunk|split)(_\d+)?\b(?! in )")
"""A graph node's name (`slice_6`, `getitem`) where a module path should be."""


# -- Phi-3: fused qkv_proj (GQA) and gate_up_proj ----------------------------------------------
def test_phi3_finds_ov_and_up_down_on_the_fused_projections() -> None:
    found = LinearGroups.compute(captured_family("phi3"))
    expected = [("norm-linear", "model.norm", ("lm_head",))]
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        expected += [
            ("norm-linear", f"model.layers.{i}.input_layernorm", (f"{attn}.qkv_proj",)),
            ("ov", f"{attn}.qkv_proj", (f"{attn}.o_proj",)),
            ("norm-linear", f"model.layers.{i}.post_attention_layernorm", (f"{mlp}.gate_up_proj",)),
            ("up-down", f"{mlp}.gate_up_proj", (f"{mlp}.down_proj",)),
        ]
    assert sorted(summary(found.groups)) == sorted(expected)
    assert found.refused == []
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    gqa = gqa_map()
    for g in found.groups:
        if g.kind == "ov":  # the v part: rows after q and k, each kv head read by 2 query heads
            v_start = q_rows + kv_rows
            v_rows = torch.arange(v_start, v_start + kv_rows)
            assert torch.equal(g.rows, v_rows)  # type: ignore[arg-type]
            assert torch.equal(g.channel_map, v_start + gqa)  # type: ignore[arg-type]
            assert g.source_channels() == kv_rows and g.channels == HEADS * HEAD_DIM
            attn = str(node_loc(g.producer)).removesuffix(".qkv_proj")  # type: ignore[arg-type]
            assert {node_loc(n) for n in g.side_reads} == {attn}  # the q and k slices
        elif g.kind == "up-down":  # chunk(2): gate first, up second
            assert torch.equal(g.rows, torch.arange(128, 256))  # type: ignore[arg-type]
            assert torch.equal(g.channel_map, torch.arange(128, 256))  # type: ignore[arg-type]
            assert g.source_channels() == 128
    lines = found.describe().splitlines()
    ov = "  ov model.layers.0.self_attn.qkv_proj -> o_proj  [rows 96:128 of 128 -> 64 channels]"
    assert ov in lines
    assert "  up-down model.layers.1.mlp.gate_up_proj -> down_proj  [rows 128:256 of 256]" in lines


# -- GPT-NeoX: query_key_value viewed to heads, then split (q, k, v interleaved per head) ---------
def test_gpt_neox_ov_channel_map_is_probed_per_head() -> None:
    found = LinearGroups.compute(captured_family("gpt_neox"))
    ov = [g for g in found.groups if g.kind == "ov"]
    assert summary(ov) == [
        (
            "ov",
            f"gpt_neox.layers.{i}.attention.query_key_value",
            (f"gpt_neox.layers.{i}.attention.dense",),
        )
        for i in range(2)
    ]
    j = torch.arange(HEADS * HEAD_DIM)
    per_head = (j // HEAD_DIM) * 3 * HEAD_DIM + 2 * HEAD_DIM + j % HEAD_DIM
    for g in ov:
        assert torch.equal(g.channel_map, per_head)  # type: ignore[arg-type]
        assert torch.equal(g.rows, per_head)  # type: ignore[arg-type]
    kinds = sorted(g.kind for g in found.groups)
    assert kinds == ["norm-linear"] * 5 + ["ov"] * 2  # GELU MLP: no up-down
    assert found.refused == []


@pytest.mark.parametrize("model", ["phi3", "gpt_neox"])
def test_random_scales_fold_exactly_and_leave_the_other_parts(model: str) -> None:
    """Every group, random scales in [0.1, 10]: logits unchanged, and an ov / up-down fold
    touches only the producer rows its targets read (the q, k and gate rows stay bit for bit)."""
    program = captured_family(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))
    ref = float_logits(program, ids)
    groups = LinearGroups.compute(program).in_layer_order()
    gen = torch.Generator().manual_seed(3)
    for g in groups:
        u = torch.rand(g.source_channels(), generator=gen, dtype=torch.float64)
        s = torch.exp((u * 2 - 1) * 2.3)
        before = {}
        if g.producer is not None:
            consts = [g.producer.args[1], *g.producer.args[2:3]]
            names = [str(c.target) for c in consts]  # type: ignore[union-attr]
            before = {name: program.weights.get(name).clone() for name in names}
        fold_scale(program, g, s)
        for name, old in before.items():
            new = program.weights.get(name)
            assert g.rows is not None
            kept = torch.ones(old.shape[0], dtype=torch.bool)
            kept[g.rows] = False
            assert torch.equal(new[kept], old[kept]), name
            assert not torch.equal(new[g.rows], old[g.rows]), name
    assert rel_err(float_logits(program, ids), ref) < 1e-4


# -- OLMo: LayerNorm without weight ------------------------------------------------------------
def test_olmo_weightless_norms_are_refused_by_module_path() -> None:
    found = LinearGroups.compute(captured_family("olmo"))
    assert sorted(g.kind for g in found.groups) == ["ov", "ov", "up-down", "up-down"]
    assert [r.nodes[0] for r in found.refused] == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    ]
    reason = (
        "the norm has no weight to absorb a scale (aten.layer_norm without weight) and its "
        "output has no other exact fold"
    )
    assert all(r.kind == "norm-linear" and r.reason == reason for r in found.refused)
    lines = found.describe().splitlines()
    head = "model.layers.0.input_layernorm -> q_proj,k_proj,v_proj"
    assert f"  refused norm-linear at {head}: {reason}" in lines
    assert f"  refused norm-linear at model.norm -> lm_head: {reason}" in lines


class WeightlessRMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps)` with no weight, read by a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_decomposed_rms_norm_without_weight_is_refused() -> None:
    program = capture(WeightlessRMSNorm().eval(), (torch.randn(2, 5, 16),))
    found = LinearGroups.compute(program)
    assert found.groups == []
    (r,) = found.refused
    assert r.kind == "norm-linear" and r.nodes[1] == "fc"
    assert "no weight to absorb a scale (x * rsqrt(...) without a per-channel weight)" in r.reason


# -- small modules: parts of one output ------------------------------------------------------------
def assert_folds_exactly(program: Program, group: LinearGroup) -> None:
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(5))
    ref = program(x)
    s = torch.rand(group.source_channels(), dtype=torch.float64) * 4 + 0.25
    fold_scale(program, group, s)
    assert torch.allclose(program(x), ref, rtol=1e-5, atol=1e-6)


class PartialRead(nn.Module):
    """fc2 reads only channels 8..23 of fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x)[..., 8:24])


def test_partial_read_scales_only_the_rows_read() -> None:
    found, program = groups_of(PartialRead())
    (g,) = found.groups
    assert g.kind == "linear-linear" and found.refused == []
    assert torch.equal(g.rows, torch.arange(8, 24))  # type: ignore[arg-type]
    assert torch.equal(g.channel_map, torch.arange(8, 24))  # type: ignore[arg-type]
    assert_folds_exactly(program, g)


class FusedQKV(nn.Module):
    """One qkv linear chunked in three, then attention and an output projection."""

    def __init__(self, layout: str = "chunk", v_from: int = 32) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.o = nn.Linear(16, 16)
        self.layout = layout  # chunk(3), slices (v from channel v_from), or view + select
        self.v_from = v_from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x)
        if self.layout == "chunk":
            q, k, v = qkv.chunk(3, dim=-1)
        elif self.layout == "select":
            parts = qkv.view(b, s, 3, 16)
            q, k, v = (parts.select(2, i) for i in range(3))
        else:
            q, k = qkv[..., :16], qkv[..., 16:32]
            v = qkv[..., self.v_from : self.v_from + 16]
        q, k, v = (t.view(b, s, 2, 8).transpose(1, 2) for t in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, s, 16))


@pytest.mark.parametrize("layout", ["chunk", "slices", "select"])
def test_fused_qkv_gives_an_ov_group_on_the_v_rows(layout: str) -> None:
    found, program = groups_of(FusedQKV(layout))
    (g,) = found.groups
    assert g.kind == "ov" and found.refused == []
    assert torch.equal(g.rows, torch.arange(32, 48))  # type: ignore[arg-type]
    assert len(g.side_reads) == 2  # the q and k parts
    assert_folds_exactly(program, g)


def test_a_side_read_overlapping_the_scaled_rows_is_refused() -> None:
    """v = channels 8..23 overlaps q (0..15) and k (16..31): scaling v's rows would change them."""
    found, program = groups_of(FusedQKV("slices", v_from=8))
    assert found.groups == []
    (r,) = found.refused
    assert r.kind == "ov" and r.nodes == ("qkv", "o")
    (qkv,) = program.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)[:1]
    q, k = (u.name for u in qkv.users if u.args[2] != 8)  # the slices other than v's
    assert r.reason == f"16 channels the targets read also reach aten.slice ({q}), aten.slice ({k})"


class FusedGateUp(nn.Module):
    """gate_up -> chunk -> up * silu(gate) -> down, the up half second (Phi-3's MLP)."""

    def __init__(self, gate_reads_up: bool = False) -> None:
        super().__init__()
        self.gate_up = nn.Linear(16, 64)
        self.down = nn.Linear(32, 16)
        self.gate_reads_up = gate_reads_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        if self.gate_reads_up:
            gate = gate + up
        return self.down(up * nn.functional.silu(gate))


def test_fused_gate_up_gives_an_up_down_group_on_the_up_rows() -> None:
    found, program = groups_of(FusedGateUp())
    (g,) = found.groups
    assert g.kind == "up-down" and found.refused == []
    assert torch.equal(g.rows, torch.arange(32, 64))  # type: ignore[arg-type]
    assert_folds_exactly(program, g)


def test_a_gate_computed_from_the_up_half_is_refused() -> None:
    found, program = groups_of(FusedGateUp(gate_reads_up=True))
    assert found.groups == []
    (r,) = found.refused
    (add,) = [n.name for n in program.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert r.nodes == ("gate_up", "down")
    assert r.reason == f"values also read by aten.add ({add})"


# -- messages name module paths -------------------------------------------------------------------
@pytest.mark.parametrize("model", ["llama", "gemma2", "opt"])
def test_refusals_of_decoders_name_module_paths(model: str) -> None:
    found = LinearGroups.compute(captured(model))
    assert found.refused
    for r in found.refused:
        assert all(n.startswith(("model.", "lm_head")) for n in r.nodes), r
        assert not GRAPH_NAME.search(r.reason), r
    if model == "llama":
        (r,) = found.refused
        assert str(r) == (
            "norm-linear at model.norm -> lm_head: weight lm_head.weight of lm_head is shared "
            "with aten.embedding in model.embed_tokens (tied weights)"
        )


class WideChain(nn.Module):
    """fc1 -> fc2 over 600 channels: more channel numbers than bf16 holds exactly (256)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 600)
        self.fc2 = nn.Linear(600, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_probe_is_exact_in_low_precision(dtype: torch.dtype) -> None:
    """The probe numbers channels in float64 whatever the model's dtype: no channel aliases
    another (which would pass for a partial read of the wrong rows)."""
    torch.manual_seed(0)
    model = WideChain().to(dtype).eval()
    program = capture(model, (torch.randn(2, 5, 16, dtype=dtype),))
    (g,) = LinearGroups.compute(program).groups
    assert torch.equal(g.channel_map, torch.arange(600))  # type: ignore[arg-type]
    assert g.rows is None and g.source_channels() == 600
