"""quarot on LayerNorm models: mean-baking, a rotation keeping the all-ones direction, exactness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimc
from slimc.analyses.residual_stream import ResidualStream
from slimc.capture import capture
from slimc.errors import UserError
from slimc.nn import QuantizedLinear
from slimc.pass_manager import PassManager
from slimc.program import RunContext
from slimc.rotate.hadamard import random_hadamard
from slimc.rotate.mean_bake import bake_means, keeping_ones
from tests import models

TOLERANCE = 1e-4  # max |out - ref| / max |ref|, fp32
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))

# family -> (norms the stream's readers go through, linears in the model)
FAMILIES = {
    "opt": (5, 13),  # LayerNorm + bias everywhere, learned positions, tied head
    "gpt_neox": (5, 9),  # fused qkv, parallel attention + MLP (two norms of one stream)
    "stablelm": (5, 15),  # LayerNorm biases read by linears without biases
    "olmo": (5, 15),  # non-parametric LayerNorm
    "cohere": (3, 15),  # LayerNorm in ops, parallel attention + MLP reading one norm
    "gpt2": (5, 9),  # Conv1D linears (canonicalized), learned positions, tied head
    "falcon": (3, 9),  # FalconLinear, parallel attention + MLP reading one norm
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def build(family: str) -> nn.Module:
    return getattr(models, f"tiny_{family}")(seed=0, layers=2)


def graph_logits(program) -> torch.Tensor:
    with torch.no_grad():
        out = program(IDS)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_norm_stream_is_rotated_exactly(family: str) -> None:
    """The graph program after quarot computes the float model's logits; LayerNorms remain."""
    model = build(family)
    program = capture(model)
    ref = logits(model)
    stream = ResidualStream.compute(program)
    assert stream.centers and stream.mean_free_readers and not stream.refused
    PassManager.parse("quarot").run(program)
    assert rel_err(graph_logits(program), ref) < TOLERANCE
    stats = program.statistics["quarot"]
    norms, _ = FAMILIES[family]
    assert stats["mean-subtracting norms (LayerNorm)"] == norms
    assert stats["mean-baked weights"] >= 5  # embedding(s) and 4 writers at least
    assert "online rotations" not in stats


@pytest.mark.parametrize("family", FAMILIES)
def test_written_back_model_is_exact_saves_and_quantizes(family: str, tmp_path) -> None:
    """The user's model keeps its LayerNorm modules and computes the same, also reloaded by
    transformers; w8a8-dynamic after quarot quantizes every linear but lm_head."""
    from transformers import AutoModelForCausalLM

    model = build(family)
    ref = logits(model)
    rotated = slimc.compile(model, "quarot", progress=False)
    assert rel_err(logits(rotated), ref) < TOLERANCE
    assert [type(m) for m in rotated.modules()] == [type(m) for m in model.modules()]
    rotated.save_pretrained(tmp_path / "float")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float").eval()
    assert rel_err(logits(reloaded), ref) < TOLERANCE
    quantized = slimc.compile(model, "quarot,w8a8-dynamic", progress=False)
    _, linears = FAMILIES[family]
    fused = quantized.slimc_program.statistics["fuse-quantized-linear"]["fused linears"]
    assert fused == linears - 1  # lm_head stays float
    assert sum(isinstance(m, QuantizedLinear) for m in quantized.modules()) == linears - 1
    with torch.no_grad():
        torch.testing.assert_close(graph_logits(quantized.slimc_program), logits(quantized))
    assert rel_err(logits(quantized), ref) < 0.1


def test_mean_baking_alone_is_exact_and_makes_the_writers_mean_free() -> None:
    model = models.tiny_opt(seed=0, layers=2)
    program = capture(model)
    ref = logits(model)
    stream = ResidualStream.compute(program)
    PassManager.parse("quarot").steps[0]._untie(program, stream, [], [])  # embedding vs lm_head
    assert bake_means(program, stream) == 2 + 2 * 4  # tables, out_proj / fc2 weights and biases
    assert rel_err(graph_logits(program), ref) < TOLERANCE
    for node in stream.embeddings:
        table = program.weights.get(str(node.args[0].target))
        assert float(table.mean(-1).abs().max()) < 1e-6
    for node in stream.writers:
        weight = program.weights.get(str(node.args[1].target))
        assert float(weight.mean(0).abs().max()) < 1e-6


def test_rotation_keeping_ones_is_orthogonal_and_fixes_the_mean_direction() -> None:
    for n in (64, 48):
        q = keeping_ones(random_hadamard(n, 1234))
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))
        torch.testing.assert_close(torch.ones(n, dtype=torch.float64) @ q, torch.ones(n).double())
        # Q differs from the Hadamard only in the plane of 1 and 1 H: a rank-2 change
        diff = q - random_hadamard(n, 1234)
        assert int(torch.linalg.matrix_rank(diff)) <= 2


def test_layer_norm_bias_goes_where_the_readers_take_it() -> None:
    """OPT's q/k/v/fc1 have biases: the norm bias moves into them. StableLM's readers have none:
    the bias stays in the norm, rotated. A zero weight under a nonzero bias: readers get biases."""
    opt = capture(models.tiny_opt(seed=0, layers=2))
    before = opt.weights.get("model.decoder.layers.0.self_attn.q_proj.bias").clone()
    PassManager.parse("quarot").run(opt)
    assert not torch.equal(opt.weights.get("model.decoder.layers.0.self_attn.q_proj.bias"), before)
    bias = opt.weights.get("model.decoder.layers.0.self_attn_layer_norm.bias")
    assert torch.equal(bias, torch.zeros_like(bias))
    weight = opt.weights.get("model.decoder.layers.0.self_attn_layer_norm.weight")
    assert torch.equal(weight, torch.ones_like(weight))

    model = models.tiny_stablelm(seed=0, layers=2)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:3] = 0.0  # under nonzero biases
    ref = logits(model)
    rotated = slimc.compile(model, "quarot", progress=False)
    assert rel_err(logits(rotated), ref) < TOLERANCE
    attn = rotated.model.layers[0].self_attn
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert rotated.model.layers[1].self_attn.q_proj.bias is None  # bias kept in that norm
    stats = rotated.slimc_program.statistics["quarot"]
    assert stats["norm biases rotated in place"] == 4


class _Stream(nn.Module):
    """embedding -> LayerNorm -> linear added back; `raw` also reads the stream without a norm;
    `online` adds a LayerNorm's output (no weight produces it) to the stream."""

    def __init__(self, raw: bool = False, online: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)
        self.post = nn.LayerNorm(16)
        self.final = nn.LayerNorm(16)
        self.head = nn.Linear(16, 32)
        self.raw, self.online = raw, online
        with torch.no_grad():
            for norm in (self.norm, self.post, self.final):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + (self.post(self.proj(self.norm(h))) if self.online else self.proj(self.norm(h)))
        out = self.head(self.final(h))
        return out + self.head(h) if self.raw else out


def test_a_linear_reading_the_raw_stream_is_rotated_without_mean_baking() -> None:
    ids = torch.randint(0, 32, (2, 5))
    model = _Stream(raw=True).eval()
    program = capture(model, (ids,))
    stream = ResidualStream.compute(program)
    assert stream.centers and not stream.mean_free_readers
    assert "reads the mean head" in stream.describe()
    with torch.no_grad():
        ref = model(ids)
    PassManager.parse("quarot").run(program)
    with torch.no_grad():
        assert rel_err(program(ids), ref) < TOLERANCE
    assert program.statistics["quarot"]["mean-baked weights"] == 0


def test_a_layer_norm_stream_needing_an_online_rotation_is_refused() -> None:
    program = capture(_Stream(online=True).eval(), (torch.randint(0, 32, (2, 5)),))
    with pytest.raises(UserError, match=r"post.*is added to a residual stream that .*centers"):
        PassManager.parse("quarot").run(program)


def test_adapt_rotation_keeps_a_layer_norm_model_exact() -> None:
    """The learned `Q R` is made to keep the all-ones direction too."""
    model = models.tiny_opt(seed=0, layers=2)
    program = capture(model)
    gen = torch.Generator().manual_seed(1)
    program.calibration = [(torch.randint(0, 128, (1, 32), generator=gen),) for _ in range(4)]
    program.context = RunContext(progress=False)
    PassManager.parse("adapt-rotation{layer-type=fc1 steps=3}").run(program)
    assert rel_err(graph_logits(program), logits(model)) < TOLERANCE
    assert program.statistics["adapt-rotation"]["mean-baked weights"] == 10


@pytest.mark.parametrize("family", ["opt", "stablelm"])
def test_rotated_and_quantized_layer_norm_model_saves_and_reloads(family: str, tmp_path) -> None:
    """compressed-tensors: the LayerNorms (weight 1, bias in place or moved into the readers)
    load as they are; the reload matches up to its per-token scale (absmax / 127.5)."""
    quantized = slimc.compile(build(family), "quarot,w8a8-dynamic", progress=False)
    reloaded = slimc.load(slimc.save(quantized, tmp_path / "ct"))
    got, want = logits(reloaded), logits(quantized)
    assert float((got - want).norm() / want.norm()) < 3e-2
