"""Quantizing mixture-of-experts models: every expert stack is quantized, each expert on its own
rows, and the written-back model (QuantizedExperts) computes what the program computes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import slimc
from slimc.errors import UserError
from slimc.linear_select import product_path
from slimc.nn import QuantizedExperts
from slimc.quant import linear_engine
from slimc.quant.expert_inputs import ExpertInputs
from slimc.quant.hessian import HessianAccumulator
from slimc.quant.qparams import quantize_weight
from slimc.quant.scheme import make_scheme
from slimc.tools.cli import check_ignore_patterns
from slimc.work_dir import WorkDir
from tests.test_moe_capture import FAMILIES, IDS, _logits, tiny_moe
from tests.test_resume import FINGERPRINT, _quantized_state

CALIB = [IDS[:1], IDS[1:]]


def _stacks(model: torch.nn.Module) -> dict[str, QuantizedExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedExperts)}


def _canonical(float_experts: torch.nn.Module, name: str) -> torch.Tensor:
    """A stack as [E, out, in], whatever layout the module stores it in."""
    w = getattr(float_experts, name).detach()
    return w.transpose(-2, -1) if float_experts.is_transposed else w


@pytest.mark.parametrize("family", list(FAMILIES))
def test_w4a16_quantizes_every_expert_of_every_family(family: str) -> None:
    model = tiny_moe(family)
    original = {n: m for n, m in tiny_moe(family).named_modules() if hasattr(m, "has_gate")}
    quantized = slimc.compile(model, "w4a16{group-size=32}", progress=False)
    program = quantized.slimc_program
    stacks = _stacks(quantized)
    assert sorted(stacks) == sorted(original)
    assert program.statistics["linear-quant"]["quantized expert stacks (w4a16)"] == 2 * len(stacks)
    spec = make_scheme("w4a16", group_size=32).weight
    for path, module in stacks.items():
        assert set(module.quantized) == {"gate_up_proj", "down_proj"}
        for name, linears in module.quantized.items():
            weight = _canonical(original[path], name)
            assert len(linears) == weight.shape[0]
            for e, linear in enumerate(linears):  # each expert rounded alone, per group of 32
                want = quantize_weight(weight[e], spec).dequantize()
                torch.testing.assert_close(linear.dequantized_weight(), want, rtol=0, atol=0)
    with torch.no_grad():
        got, want = _logits(quantized(IDS)), _logits(program(IDS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    generated = quantized.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize("family", ["Qwen3Moe", "GptOss", "DeepseekV3"])
@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-dynamic"])
def test_w8a8_on_experts_matches_the_program_and_stays_close_to_float(
    family: str, scheme: str
) -> None:
    model = tiny_moe(family)
    with torch.no_grad():
        reference = model(IDS).logits
    # experts (and DeepSeek's shared experts) only: their error alone (8-bit MLA attention
    # moves this tiny DeepSeek's logits by 4%)
    quantized = slimc.compile(model, f"{scheme}{{only=*experts*}}", calib=CALIB, progress=False)
    program = quantized.slimc_program
    stats = program.statistics["linear-quant"]
    assert stats[f"quantized expert stacks ({scheme})"] >= 2
    assert stats.get(f"quantized linears ({scheme})", 0) == (3 if family == "DeepseekV3" else 0)
    with torch.no_grad():
        got = _logits(quantized(IDS))
        # int8 products vs the program's dequantized float ones: a per-token code may round
        # the other way on a tie, one step of the down projection's input scale
        torch.testing.assert_close(got, _logits(program(IDS)), rtol=1e-3, atol=1e-3)
    rel = float((got - reference).abs().max() / reference.abs().max())
    assert 0 < rel < 0.02
    if scheme == "w8a8":  # one static input range per stack, observed over all routed rows
        linears = next(iter(_stacks(quantized).values())).quantized["down_proj"]
        scales = {float(linear.input_scale) for linear in linears}
        assert len(scales) == 1 and scales.pop() > 0


def test_expert_inputs_give_each_expert_the_hessian_of_its_own_rows() -> None:
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(30, 8, generator=g), torch.randint(0, 4, (30,), generator=g)
    ids[ids == 2] = 1  # expert 2 gets no row
    inputs = ExpertInputs(4, lambda: HessianAccumulator(8))
    inputs.update(x[:17], ids[:17])
    inputs.update(x[17:], ids[17:])
    assert inputs.of(2) is None and inputs.rows[2] == 0
    for e in (0, 1, 3):
        alone = HessianAccumulator(8)
        alone.update(x[ids == e])
        assert inputs.rows[e] == int((ids == e).sum())
        torch.testing.assert_close(inputs.of(e).hessian, alone.hessian)


def _stack_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        linear.dequantized_weight()
        for module in _stacks(model).values()
        for linears in module.quantized.values()
        for linear in linears
    ]


def test_gptq_rounds_each_expert_on_its_own_hessian_and_falls_back_below_min_tokens() -> None:
    model = tiny_moe("Qwen3Moe")
    with torch.no_grad():
        reference = model(IDS).logits

    def run(pipeline: str) -> tuple[torch.nn.Module, dict[str, float]]:
        out = slimc.compile(tiny_moe("Qwen3Moe"), pipeline, calib=CALIB, progress=False)
        return out, out.slimc_program.statistics[pipeline.partition("{")[0]]

    rtn, _ = run("linear-quant{scheme=w4a16}")
    gptq, stats = run("gptq{scheme=w4a16 expert-min-tokens=1}")
    assert stats["quantized expert stacks (w4a16)"] == 4
    assert (
        stats["output error (sum over linears)"] < stats["output error of RTN (sum over linears)"]
    )
    with torch.no_grad():
        err_rtn = (_logits(rtn(IDS)) - reference).abs().max()
        err_gptq = (_logits(gptq(IDS)) - reference).abs().max()
    assert err_gptq < err_rtn
    pairs = zip(_stack_weights(gptq), _stack_weights(rtn), strict=True)
    changed = [not torch.equal(a, b) for a, b in pairs]
    assert sum(changed) >= 16  # most of the 32 experts x stacks saw tokens and moved off RTN
    # 24 tokens x top-2 over 8 experts: no expert reaches 1000 tokens, all round to nearest
    fallback, stats = run("gptq{scheme=w4a16 expert-min-tokens=1000}")
    assert stats["experts rounded to nearest (too few tokens)"] == 32
    for a, b in zip(_stack_weights(fallback), _stack_weights(rtn), strict=True):
        assert torch.equal(a, b)


def test_autoround_leaves_expert_stacks_in_float_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        tuned = slimc.compile(
            tiny_moe("Qwen3Moe"), "autoround{scheme=w4a16 iters=2}", calib=CALIB, progress=False
        )
    assert "autoround: leaving 4 MoE expert stacks in float" in caplog.text
    stats = tuned.slimc_program.statistics["autoround"]
    assert stats["expert stacks left in float"] == 4
    assert not _stacks(tuned)


def test_ignore_matches_expert_stacks_by_name() -> None:
    quantized = slimc.compile(
        tiny_moe("Mixtral"), "w8a8-dynamic{ignore=lm_head,*.down_proj}", progress=False
    )
    stats = quantized.slimc_program.statistics["linear-quant"]
    assert stats["quantized expert stacks (w8a8-dynamic)"] == 2
    for module in _stacks(quantized).values():
        assert set(module.quantized) == {"gate_up_proj"}
        assert module.module.down_proj.dtype == torch.float32  # left float, still in place


def test_resumed_gptq_on_experts_replays_the_finished_layer_bitwise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = "gptq{scheme=w4a16 expert-min-tokens=1}"
    work = WorkDir.open(tmp_path / "w", FINGERPRINT, resume=False)
    whole = slimc.compile(
        tiny_moe("Qwen3Moe"), pipeline, calib=CALIB, progress=False, work_dir=work
    )
    records = sorted(work.path.glob("*/*.safetensors"))
    assert [p.stem for p in records] == ["model.layers.0", "model.layers.1"]
    records[1].unlink()  # as if the run had been killed in layer 1
    again = WorkDir.open(tmp_path / "w", FINGERPRINT, resume=True)
    with caplog.at_level(logging.WARNING):
        resumed = slimc.compile(
            tiny_moe("Qwen3Moe"), pipeline, calib=CALIB, progress=False, work_dir=again
        )
    assert "resuming at layer 2 of 2" in caplog.text
    want, got = _quantized_state(whole), _quantized_state(resumed)
    assert any(".experts.quantized.down_proj." in name for name in want)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_cli_ignore_globs_may_name_expert_stacks() -> None:
    model = tiny_moe("Qwen3Moe")
    check_ignore_patterns(model, ["*.experts.down_proj", "model.layers.1.mlp.experts.*"])
    with pytest.raises(UserError, match=r"--ignore '\*experts.w2' matches no linear"):
        check_ignore_patterns(model, ["*experts.w2"])


def test_calibrate_all_experts_gives_every_expert_every_tokens_inputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_moe("Qwen3Moe")
    collected: dict[str, ExpertInputs] = {}
    round_stack = linear_engine.round_expert_stack

    def spy(quant, program, node, weight, spec, inputs, method):  # type: ignore[no-untyped-def]
        collected[product_path(node)] = inputs
        return round_stack(quant, program, node, weight, spec, inputs, method)

    monkeypatch.setattr(linear_engine, "round_expert_stack", spy)
    normed: list[torch.Tensor] = []  # layer 0's MoE input, every token
    norm = model.model.layers[0].post_attention_layernorm
    handle = norm.register_forward_hook(lambda m, i, o: normed.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        for ids in CALIB:
            model(ids)
    handle.remove()
    tokens = torch.cat(normed)
    experts = model.model.layers[0].mlp.experts
    pipeline = "gptq{scheme=w4a16 group-size=16 calibrate-all-experts=true}"
    slimc.compile(model, pipeline, calib=CALIB, progress=False)
    up = collected["model.layers.0.mlp.experts.gate_up_proj"]
    down = collected["model.layers.0.mlp.experts.down_proj"]
    assert up.rows == down.rows == [tokens.shape[0]] * experts.num_experts
    for e in range(experts.num_experts):
        gate, lin = (tokens @ experts.gate_up_proj[e].detach().T).chunk(2, dim=-1)
        activations = torch.nn.functional.silu(gate) * lin
        for inputs, rows in ((up, tokens), (down, activations)):
            want = HessianAccumulator(rows.shape[-1])
            want.update(rows)
            torch.testing.assert_close(inputs.of(e).hessian, want.hessian, rtol=1e-4, atol=1e-5)


def test_cli_calibrate_all_experts_reaches_the_weight_method() -> None:
    from slimc.pass_manager import PassManager
    from slimc.tools.cli import build_pipeline, make_parser

    argv = ["quant", "--quant-type", "w4a16", "--weight-method", "gptq", "--save", "x"]
    for extra, want in (([], False), (["--calibrate-all-experts"], True)):
        args = make_parser().parse_args([*argv, *extra])
        gptq = PassManager.parse(build_pipeline(args)).steps[0]
        assert gptq.name == "gptq" and gptq.calibrate_all_experts is want  # type: ignore[attr-defined]


def test_an_inplace_compile_frees_the_float_stacks_and_shares_the_codes() -> None:
    """A MoE checkpoint's stacks are fused by transformers in anonymous memory: once quantized,
    nothing may keep them (the program's weight source forgets replaced weights), and each
    expert's int8 codes are views of the program's stacked codes, not copies."""
    model = tiny_moe("Qwen3Moe").to(torch.bfloat16)
    stacks = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 3)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    quantized = slimc.compile(model, "w8a8-dynamic", progress=False, inplace=True)
    program = quantized.slimc_program
    assert program.weight_source is not None
    assert 0 < program.weight_source.nbytes() <= total - stacks
    codes = {t.untyped_storage().data_ptr() for _, t in program.weights.items()}
    experts = _stacks(quantized)["model.layers.0.mlp.experts"]
    for linear in experts.quantized["gate_up_proj"]:
        assert linear.qweight.untyped_storage().data_ptr() in codes
