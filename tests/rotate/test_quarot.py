"""quarot is exact: fp32 logits of the rotated graph and of the written-back model, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimc
from slimc.analyses.residual_stream import ResidualStream
from slimc.capture import capture
from slimc.errors import PipelineError, UserError
from slimc.nn import HadamardInputRotation, HadamardRotation, QuantizedLinear
from slimc.pass_manager import PassManager
from slimc.passes.quarot import QuaRot
from slimc.rotate.hadamard import random_hadamard
from tests.models import captured, tiny_gemma2, tiny_gemma3, tiny_llama, tiny_olmo2

TOLERANCE = 1e-4  # max |out - ref| / max |ref|, fp32
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def with_random_norms(model: nn.Module) -> nn.Module:
    """Norm weights away from 1, so fusing them (and untying lm_head) changes something."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# -- the graph -------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [True, False])
def test_rotated_graph_keeps_logits(heads: bool) -> None:
    program = capture(with_random_norms(tiny_llama(layers=2)))
    with torch.no_grad():
        ref = program(IDS)
    embedding = program.weights.get("lm_head.weight").double().clone()
    v_before = program.weights.get("model.layers.0.self_attn.v_proj.weight").clone()
    PassManager.parse(f"quarot{{rotate-heads={str(heads).lower()}}}").run(program)
    with torch.no_grad():
        assert rel_err(program(IDS), ref) < TOLERANCE

    # the tied table is split: the embedding reads its own rotated copy, E Q
    q = random_hadamard(64, 1234)
    got = program.weights.get("model.embed_tokens.weight").double()
    torch.testing.assert_close(got, embedding @ q, rtol=0, atol=1e-6)
    assert not torch.allclose(program.weights.get("lm_head.weight").double(), embedding @ q)
    # norms are fused: every scale is one
    for name, w in program.weights.items():
        if name.endswith("norm.weight"):
            assert torch.equal(w, torch.ones_like(w)), name
    stats = program.statistics["quarot"]
    assert stats["fused norms"] == 5
    assert stats["rotated linears"] == 15  # 7 per layer and lm_head
    assert stats["rotated embeddings"] == 1
    assert stats["untied embeddings"] == 1
    assert stats["rotated attention heads (v/o pairs)"] == (2 if heads else 0)
    # online=auto adds no run-time rotation where every fold is exact
    assert "online rotations" not in stats and "mean-baked weights" not in stats
    assert not [n for n in program.graph.nodes if "hadamard" in str(n.target)]
    v_after = program.weights.get("model.layers.0.self_attn.v_proj.weight")
    assert not torch.allclose(v_after, v_before)


def test_residual_stream_of_llama() -> None:
    stream = ResidualStream.compute(captured("llama"))
    assert stream.hidden == 64 and not stream.refused and not stream.online
    assert [n.meta["slimc_loc"].rsplit(".", 1)[-1] for n in stream.writers] == [
        "o_proj",
        "down_proj",
    ] * 2
    assert len(stream.readers) == 11 and len(stream.norms) == 5
    assert "norm model.norm -> lm_head" in stream.describe()


def test_seed_changes_weights_not_outputs() -> None:
    outs, weights = [], []
    for seed in (1234, 99):
        program = captured("llama")
        PassManager.parse(f"quarot{{seed={seed}}}").run(program)
        with torch.no_grad():
            outs.append(program(IDS))
        weights.append(program.weights.get("model.layers.0.self_attn.q_proj.weight").clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(weights[0], weights[1])


# -- slimc.compile: written back into the user's model ---------------------------------------------
def test_compile_writes_back_and_unties_lm_head(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = with_random_norms(tiny_llama(layers=2))
    rotated = slimc.compile(model, "quarot", progress=False)
    ref = logits(model)
    assert rel_err(logits(rotated), ref) < TOLERANCE
    with torch.no_grad():
        assert torch.equal(rotated.slimc_program(IDS), logits(rotated))
    # the input model is untouched and still tied; the result is untied, also in its config
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight
    assert not rotated.config.tie_word_embeddings
    rotated.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert rel_err(logits(reloaded), ref) < TOLERANCE
    generated = rotated.generate(IDS[:1, :6], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, model.generate(IDS[:1, :6], max_new_tokens=6, do_sample=False))


def test_rotation_then_dynamic_w8a8_quantizes_and_saves(tmp_path) -> None:
    model = with_random_norms(tiny_llama(layers=2))
    q = slimc.compile(model, "quarot,w8a8-dynamic", progress=False)
    stats = q.slimc_program.statistics
    assert stats["quarot"]["rotated linears"] == 15
    assert stats["fuse-quantized-linear"]["fused linears"] == 14  # lm_head stays float
    assert isinstance(q.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert rel_err(logits(q), logits(model)) < 0.05
    reloaded = slimc.load(slimc.save(q, tmp_path / "ct"))
    # the rotated float embedding and lm_head are saved apart and reload untied
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(reloaded.get_parameter(name), q.get_parameter(name))
    # compressed-tensors emulates per-token activations with absmax / 127.5 (slimc: / 127)
    got, want = logits(reloaded), logits(q)
    assert float((got - want).norm() / want.norm()) < 3e-2


# -- values no weight can rotate: online rotations ------------------------------------------------
def test_online_option_spellings() -> None:
    assert QuaRot().online == "auto" and QuaRot(online=True).online == "always"
    spellings = [("true", "always"), ("False", "never"), ("always", "always"), ("auto", "auto")]
    for text, mode in spellings:
        (step,) = PassManager.parse(f"quarot{{online={text}}}").steps
        assert isinstance(step, QuaRot) and step.online == mode
    with pytest.raises(PipelineError, match="option 'online' of pass 'quarot': bad value 'maybe'"):
        PassManager.parse("quarot{online=maybe}")


@pytest.mark.parametrize("never", ["never", "false"])
def test_online_never_refuses_sandwich_norms_with_the_module_named(never: str) -> None:
    program = captured("gemma2")
    with pytest.raises(
        UserError,
        match=r"type_as_1 \(model.layers.0.post_attention_layernorm\) is added to the residual "
        r"stream at add_12.*\(quarot\{online=auto\} rotates it at run time\)",
    ):
        PassManager.parse(f"quarot{{online={never}}}").run(program)


@pytest.mark.parametrize("family", [tiny_gemma2, tiny_gemma3, tiny_olmo2])
def test_sandwich_norms_are_rotated_online_by_plain_quarot(family) -> None:
    """Gemma2/Gemma3 (pre and post norms) and OLMo2 (post norms only): exact, counted."""
    model = family(seed=0, layers=2)
    program = capture(model)
    with torch.no_grad():
        ref = model(IDS).logits
    PassManager.parse("quarot").run(program)
    with torch.no_grad():
        assert rel_err(program(IDS), ref) < TOLERANCE
    stats = program.statistics["quarot"]
    assert stats["online rotations"] == 4  # after attention and after the MLP, 2 layers
    hadamards = [n for n in program.graph.nodes if "hadamard" in str(n.target)]
    assert sorted({n.meta["slimc_loc"].rsplit(".", 1)[-1] for n in hadamards}) == [
        "post_attention_layernorm",
        "post_feedforward_layernorm",
    ]


def test_gemma2_online_rotation_is_exact_and_written_back(tmp_path) -> None:
    model = tiny_gemma2(layers=2)
    rotated = slimc.compile(model, "quarot", progress=False)
    assert rel_err(logits(rotated), logits(model)) < TOLERANCE
    wrapped = [n for n, m in rotated.named_modules() if isinstance(m, HadamardRotation)]
    assert wrapped == [
        f"model.layers.{i}.{norm}"
        for i in range(2)
        for norm in ("post_attention_layernorm", "post_feedforward_layernorm")
    ]
    stats = rotated.slimc_program.statistics["quarot"]
    assert stats["online rotations"] == 4 and stats["fused norms"] == 5
    q = slimc.compile(model, "quarot{online=always},w8a8-dynamic", progress=False)
    with torch.no_grad():
        assert torch.equal(q.slimc_program(IDS), logits(q))
    with pytest.raises(UserError, match="quarot rotates the output of model.layers.0.*pt2"):
        slimc.save(q, tmp_path / "ct")


def test_hidden_states_output_is_refused() -> None:
    class Returns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 12)
            self.proj = nn.Linear(12, 12)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.embed(ids)
            return h + self.proj(h)

    program = capture(Returns(), (torch.zeros(1, 4, dtype=torch.long),))
    with pytest.raises(UserError, match="stream: output: the stream is a graph output"):
        PassManager.parse("quarot").run(program)


# -- SmolLM2 ---------------------------------------------------------------------------------------
def test_online_input_rotation_of_down_proj_is_exact_and_survives_quantization() -> None:
    model = with_random_norms(tiny_llama(layers=2))
    ref = logits(model)
    rotated = slimc.compile(model, "quarot{online-inputs=down_proj}")
    assert rel_err(logits(rotated), ref) < TOLERANCE
    stats = rotated.slimc_program.statistics["quarot"]
    assert stats["online input rotations"] == 2
    down = rotated.model.layers[0].mlp.down_proj
    assert isinstance(down, HadamardInputRotation) and isinstance(down.module, nn.Linear)
    # with 4-bit activations the rotation sits in front of the quantized linear, graph == model
    quantized = slimc.compile(model, "quarot{online-inputs=down_proj},w4a4")
    down = quantized.model.layers[1].mlp.down_proj
    assert isinstance(down, HadamardInputRotation) and isinstance(down.module, QuantizedLinear)
    with torch.no_grad():
        graph = quantized.slimc_program(IDS)
    graph = graph[0] if isinstance(graph, (tuple, list)) else graph
    torch.testing.assert_close(logits(quantized), graph, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="matches no linear"):
        slimc.compile(model, "quarot{online-inputs=nothing_here}")


@pytest.mark.slow
def test_quarot_keeps_smollm2_logits() -> None:
    """SmolLM2-135M (hidden 576 = 36 * 16, tied embeddings): rotated graph and model exact."""
    from slimc.data import eval_token_ids, load_model

    model, tok = load_model(None)
    window = eval_token_ids(tok)[:512].unsqueeze(0)
    with torch.no_grad():
        ref = model(window).logits
    rotated = slimc.compile(model, "quarot", progress=False)
    with torch.no_grad():
        graph = rotated.slimc_program(window)
        out = rotated(window).logits
    err_graph, err_model = rel_err(graph, ref), rel_err(out, ref)
    print(
        f"\nSmolLM2 quarot: max relative logit error graph {err_graph:.3g}, model {err_model:.3g}"
    )
    assert err_graph < TOLERANCE and err_model < TOLERANCE
    stats = rotated.slimc_program.statistics["quarot"]
    assert stats["rotated linears"] == 30 * 7 + 1
    assert stats["fused norms"] == 61
    assert stats["rotated attention heads (v/o pairs)"] == 30
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight
