"""Every decoder family slimc claims, on tiny random models: capture, smoothing and quarot exact,
every linear quantized, save + reload, generate, and the bf16 CPU lowering."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

import slimc
import slimc.compiler
from slimc.analyses.linear_groups import LinearGroups
from slimc.capture import capture
from slimc.errors import UserError
from slimc.nn import KernelLinear, QuantizedLinear
from slimc.pass_manager import PassManager
from slimc.program import Program, RunContext
from slimc.weight_source import needs_widening
from tests.families import FAMILIES, FAMILY_SPECS, LAYERS, VOCAB, linear_like_modules

TOLERANCE = 1e-4  # max |out - ref| / max |ref|, fp32
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
CALIB = [
    torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)
]
# every smoothing pass, with grids small enough for tiny models (the folds are what is checked)
SMOOTHING = {
    "smooth-quant": "smooth-quant",
    "iter-smooth": "iter-smooth",
    "flex-smooth-quant": "flex-smooth-quant{grid-step=0.25 max-tokens=256}",
    "awq": "awq{group-size=32 n-grid=4 search-samples=2}",
    "flex-awq-ssz": "flex-awq-ssz{grid-step=0.25 max-tokens=256}",
}
SCHEMES = ["w8a8-dynamic", "w4a16{group-size=32}"]

# Parametrizations that fail for a known, open reason (issue 14): strict, so a fix flips them.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}  # (check, family) -> reason


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().max() / ref.abs().max())


def logits(model: nn.Module | Program, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out if isinstance(out, torch.Tensor) else out.logits


def cases(check: str, families: Sequence[str] = tuple(FAMILIES)) -> list[Any]:
    """The families as pytest params, a known failure of `check` marked strict xfail."""
    out = []
    for family in families:
        reason = KNOWN_FAILURES.get((check, family))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(family, marks=marks, id=family))
    return out


# -- shared captures ---------------------------------------------------------------------------
class Zoo:
    """Each family's float model and captured program, built once for the module.

    `compile` runs `slimc.compile` on a family's model; its capture step is served from the
    program captured once here (a deep copy), since capture is what takes the time on tiny models
    and `test_capture_is_exact` checks it on its own.
    """

    def __init__(self) -> None:
        self.models: dict[tuple[str, torch.dtype], nn.Module] = {}
        self.programs: dict[tuple[str, torch.dtype, torch.dtype | None], Program] = {}
        self.compiled: dict[tuple[str, str, torch.dtype], nn.Module] = {}

    def model(self, family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        key = (family, dtype)
        if key not in self.models:
            model = FAMILIES[family]().to(dtype)
            model._sweep_key = key  # deep copies (slimc.compile's) keep it
            self.models[key] = model
        return self.models[key]

    def program(
        self,
        family: str,
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ) -> Program:
        if not needs_widening(self.model(family, dtype), compute_dtype):
            compute_dtype = None  # capture computes in the model's own dtype either way
        key = (family, dtype, compute_dtype)
        if key not in self.programs:
            model = copy.deepcopy(self.model(family, dtype))
            self.programs[key] = capture(model, compute_dtype=compute_dtype)
        return self.programs[key]

    def shared_capture(self, real: Callable[..., Program]) -> Callable[..., Program]:
        def capture_or_copy(
            model: nn.Module,
            example_inputs: Any = None,
            compute_dtype: torch.dtype | None = None,
            **kw: Any,
        ) -> Program:
            key = getattr(model, "_sweep_key", None)
            if key is None or example_inputs is not None or kw:
                return real(model, example_inputs, compute_dtype=compute_dtype, **kw)
            return copy.deepcopy(self.program(*key, compute_dtype=compute_dtype))

        return capture_or_copy

    def compile(self, family: str, pipeline: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        """`slimc.compile(model, pipeline)` of the family's model, once per module."""
        key = (family, pipeline, dtype)
        if key not in self.compiled:
            self.compiled[key] = slimc.compile(self.model(family, dtype), pipeline, progress=False)
        return self.compiled[key]


@pytest.fixture(scope="module")
def zoo() -> Iterator[Zoo]:
    zoo = Zoo()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(slimc.compiler, "capture", zoo.shared_capture(slimc.compiler.capture))
        yield zoo


def quantized_names(model: nn.Module, kind: type = QuantizedLinear) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, kind)}


# -- capture ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", cases("capture"))
def test_capture_is_exact(zoo: Zoo, family: str) -> None:
    model, program = zoo.model(family), zoo.program(family)
    tol = 0.0 if FAMILY_SPECS[family].bitwise_capture else 1e-6
    for ids in (IDS, IDS[:1, :5], torch.randint(0, VOCAB, (3, 9))):
        ref = logits(model, ids)
        torch.testing.assert_close(logits(program, ids), ref, rtol=0, atol=tol * ref.abs().max())


@pytest.mark.parametrize("shape", [(1, 64), (1, 1), (3, 16)], ids=["b1xl64", "b1xl1", "b3xl16"])
@pytest.mark.parametrize("family", cases("example-shapes", ["llama", "gpt2"]))
def test_any_example_shape_captures_a_dynamic_program(
    zoo: Zoo, family: str, shape: tuple[int, int]
) -> None:
    example = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(3))
    model = zoo.model(family)
    compiled = slimc.compile(model, "", example_inputs=(example,), progress=False)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(logits(compiled.slimc_program, ids), logits(model, ids))


# -- exact transforms ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", cases("groups"))
def test_smoothing_groups_are_found(zoo: Zoo, family: str) -> None:
    """One v -> o group per layer, one up -> down per gated MLP, a norm -> linears group per
    weighted norm; nothing refused but a final norm feeding a tied lm_head."""
    spec = FAMILY_SPECS[family]
    groups = LinearGroups.compute(copy.deepcopy(zoo.program(family)))
    per_kind = {kind: 0 for kind in ("norm-linear", "ov", "up-down", "linear-linear")}
    for g in groups.groups:
        per_kind[g.kind] += 1
    refused = [str(r) for r in groups.refused if "tied weights" not in str(r)]
    assert per_kind["ov"] == LAYERS, (per_kind, refused)
    assert per_kind["up-down"] == (LAYERS if spec.gated_mlp else 0), (per_kind, refused)
    if spec.pre_norm_groups:
        assert per_kind["norm-linear"] >= LAYERS, (per_kind, refused)
        assert not refused
    else:  # no norm -> linears group in a layer; a weightless norm is refused by name
        in_layers = [g for g in groups.groups if g.kind == "norm-linear" and ".layers." in g.name]
        assert not in_layers
        assert all("the norm has no weight" in r for r in refused), refused


@pytest.mark.parametrize("name", list(SMOOTHING))
@pytest.mark.parametrize("family", cases("smoothing"))
def test_smoothing_is_exact(zoo: Zoo, family: str, name: str) -> None:
    program = copy.deepcopy(zoo.program(family))
    program.calibration = [(c,) for c in CALIB]
    program.context = RunContext(progress=False)
    ref = logits(program)
    before = {k: v.clone() for k, v in program.weights.items()}
    PassManager.parse(SMOOTHING[name]).run(program)
    assert rel_err(logits(program), ref) < TOLERANCE
    changed = any(not torch.equal(w, before[k]) for k, w in program.weights.items())
    counts = program.statistics.get(name, {})
    smoothed = sum(v for k, v in counts.items() if k.startswith("smoothed "))
    if name == "smooth-quant" and not FAMILY_SPECS[family].pre_norm_groups:
        assert smoothed == 0 and not changed  # smooth-quant smooths norm -> linears only
    else:
        assert smoothed > 0 and changed, counts
    if name == "iter-smooth":  # every group of every kind is smoothed
        groups = LinearGroups.compute(copy.deepcopy(zoo.program(family))).groups
        for kind in ("ov", "up-down"):
            assert counts.get(f"smoothed {kind} groups", 0) == sum(g.kind == kind for g in groups)


@pytest.mark.parametrize("family", cases("quarot"))
def test_quarot_is_exact_on_the_written_back_model(zoo: Zoo, family: str) -> None:
    model = zoo.model(family)
    rotated = zoo.compile(family, "quarot")
    assert rel_err(logits(rotated), logits(model)) < TOLERANCE
    assert rel_err(logits(rotated.slimc_program), logits(model)) < TOLERANCE
    # every linear reads or writes the residual stream: all are rotated offline, lm_head too,
    # but the writers into a sandwich norm (o_proj, down_proj): it is rotated at run time
    online = 2 * LAYERS if FAMILY_SPECS[family].sandwich_norms else 0
    stats = rotated.slimc_program.statistics["quarot"]
    assert stats["rotated linears"] == len(linear_like_modules(model)) + 1 - online, stats
    assert stats.get("online rotations", 0) == online, stats


# -- quantization, save, generate ---------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", cases("quantize"))
def test_every_linear_is_quantized(zoo: Zoo, family: str, scheme: str) -> None:
    model = zoo.model(family)
    q = zoo.compile(family, scheme)
    assert quantized_names(q) == set(linear_like_modules(model))
    assert rel_err(logits(q), logits(model)) < 0.5


@pytest.mark.parametrize("family", cases("save"))
def test_save_and_reload(zoo: Zoo, family: str, tmp_path) -> None:
    q = zoo.compile(family, "w4a16{group-size=32}")
    fmt = FAMILY_SPECS[family].save_format
    out = slimc.save(q, tmp_path / "saved", format=fmt)
    reloaded = slimc.load(out)
    assert (out / "model.pt2").exists() is (fmt == "pt2")
    assert isinstance(reloaded, PreTrainedModel) is (fmt == "compressed-tensors")
    got, want = logits(reloaded), logits(q)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    if fmt == "pt2":  # compressed-tensors cannot hold this model: refused, with the reason
        with pytest.raises(UserError, match="compressed-tensors"):
            slimc.save(q, tmp_path / "ct", format="compressed-tensors")


def assert_generates_greedily(model: nn.Module, new_tokens: int = 4) -> None:
    """generate() with the KV cache picks the tokens a full forward's argmax picks."""
    prompt = IDS[:1, :6]
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    assert out.shape == (1, prompt.shape[1] + new_tokens)
    full = logits(model, out[:, :-1]).float()
    eos = model.generation_config.eos_token_id  # min_new_tokens keeps it from being picked
    full[..., torch.tensor([eos] if isinstance(eos, int) else eos or [], dtype=torch.long)] = -1e9
    picked = full[0, prompt.shape[1] - 1 :].argmax(-1)
    assert torch.equal(picked, out[0, prompt.shape[1] :])


@pytest.mark.parametrize("family", cases("generate"))
def test_quantized_model_generates(zoo: Zoo, family: str) -> None:
    assert_generates_greedily(zoo.compile(family, "w8a8-dynamic"))


@pytest.mark.parametrize("family", cases("lower-cpu"))
def test_bf16_lower_cpu_runs_and_generates(
    zoo: Zoo, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLIMC_CPU_COMPILE", "0")  # the kernels' helpers eagerly: no inductor
    model = zoo.model(family, torch.bfloat16)
    lowered = zoo.compile(family, "w8a8-dynamic,lower-cpu", torch.bfloat16)
    assert quantized_names(lowered, KernelLinear) == set(linear_like_modules(model))
    out = logits(lowered)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, logits(model)) < 0.5
    assert_generates_greedily(lowered)
