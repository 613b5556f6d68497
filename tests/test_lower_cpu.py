"""lower-cpu: each CPU kernel op against the reference ops, and whole lowered models."""

from __future__ import annotations

import pytest
import torch

import slimc
import slimc.kernels.cpu as cpu_kernels
from slimc.nn import KernelLinear
from slimc.ops.packing import pack_int4
from tests.models import tiny_llama

ops = torch.ops.slimc


@pytest.fixture(params=["eager", "compiled"])
def compile_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the kernel ops' quantization / epilogue helpers eagerly or torch.compile'd."""
    monkeypatch.setenv("SLIMC_CPU_COMPILE", "0" if request.param == "eager" else "1")
    return request.param


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (-8, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("engine", ["onednn", "int_mm"])
def test_int8_dynamic_is_the_reference(
    compile_mode: str, qmin: int, qmax: int, with_bias: bool, engine: str
):
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (48, 96), dtype=torch.int8, generator=gen)
    ws = torch.rand(48, generator=gen) * 1e-2
    bias = torch.randn(48, generator=gen) if with_bias else None
    for shape in ((1, 96), (3, 5, 96), (17, 96), (2, 20, 96)):  # oneDNN from 512 outputs
        x = torch.randn(*shape, generator=gen)
        xq, xs = ops.quantize_per_token(x, qmin, qmax)
        ref = ops.linear_w8a8(xq, xs, None, w, ws, bias, torch.float32)
        got = ops.cpu_linear_int8_dynamic(x, w, ws, bias, qmin, qmax, engine)
        assert got.shape == ref.shape and got.is_contiguous()  # callers view() the output
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [48, 64, 80])  # 12 x 4 (Paley x Sylvester), 2^6, 20 x 4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("engine", ["onednn", "int_mm"])
def test_int8_dynamic_behind_a_rotation_is_the_reference(
    compile_mode: str, k: int, dtype: torch.dtype, engine: str
):
    from slimc.rotate.hadamard import random_signs

    gen = torch.Generator().manual_seed(k)
    w = torch.randint(-127, 128, (24, k), dtype=torch.int8, generator=gen)
    ws, bias = torch.rand(24, generator=gen) * 1e-2, torch.randn(24, generator=gen)
    signs = random_signs(k, seed=7)
    sign_scale = (signs / k**0.5).float()
    for shape in ((1, k), (3, 5, k), (4, 90, k)):  # the last one past the eager-quantize size
        x = torch.randn(*shape, generator=gen).to(dtype)
        xq, xs = ops.hadamard_quantize_per_token(x, signs, -128, 127)
        ref = ops.linear_w8a8(xq, xs, None, w, ws, bias, dtype)
        got = ops.cpu_linear_int8_dynamic_hadamard(x, sign_scale, w, ws, bias, -128, 127, engine)
        assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_onednn_product_is_the_int32_product():
    from slimc.kernels.cpu import onednn

    if not onednn.available():
        pytest.skip("oneDNN's int8 linear is not exact on this CPU (no VNNI / AMX)")
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(-128, 128, (64, 320), dtype=torch.int8, generator=gen)
    x = torch.randint(-128, 128, (24, 320), dtype=torch.int8, generator=gen)
    expected = torch._int_mm(x, w.t()).float()
    assert torch.equal(onednn.matmul(x, w), expected)


def test_onednn_is_not_used_where_its_int8_sums_saturate(monkeypatch: pytest.MonkeyPatch):
    """Without VNNI / AMX, oneDNN adds product pairs in int16 with saturation: never bind it."""
    import platform

    from slimc.kernels.cpu import onednn

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    onednn.exact_int8_products.cache_clear()
    try:
        assert not onednn.available()
        assert onednn.default_engine(8192, 8192) == "int_mm"
    finally:
        onednn.exact_int8_products.cache_clear()


def test_onednn_weights_are_packed_once_per_weight_and_freed_with_it():
    import gc

    from slimc.kernels.cpu import onednn

    gen = torch.Generator().manual_seed(2)
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=gen)
    packed = onednn.packed_weight(w)
    assert onednn.packed_weight(w) is packed and id(w) in onednn._PACKED
    key = id(w)
    del w, packed
    gc.collect()
    assert key not in onednn._PACKED


def test_onednn_binding_runs_int_mm_where_onednn_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=gen)
    ws, x = torch.rand(16, generator=gen) * 1e-2, torch.randn(40, 32, generator=gen)
    expected = ops.cpu_linear_int8_dynamic(x, w, ws, None, -128, 127, "int_mm")
    monkeypatch.setenv("SLIMC_CPU_ONEDNN", "0")
    monkeypatch.setattr(cpu_kernels.ops, "_warned_engines", set())
    with caplog.at_level("WARNING"):
        got = ops.cpu_linear_int8_dynamic(x, w, ws, None, -128, 127, "onednn")
    assert torch.equal(got, expected) and "not available" in caplog.text
    with pytest.raises(ValueError, match="unknown int8 engine"):
        ops.cpu_linear_int8_dynamic(x, w, ws, None, -128, 127, "mkl")


def test_int8_static_folds_the_zero_point(compile_mode: str):
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=gen)
    ws, bias = torch.rand(32, generator=gen) * 1e-2, torch.randn(32, generator=gen)
    x = torch.randn(2, 7, 64, generator=gen)
    xs, xz = torch.tensor([0.02]), torch.tensor([5], dtype=torch.int32)
    xq = ops.quantize_affine(x, [-1, -1, -1], xs, xz, -128, 127, torch.int8)
    ref = ops.linear_w8a8(xq, xs, xz, w, ws, bias, torch.float32)
    w_sum = w.to(torch.int32).sum(dim=1, dtype=torch.int32)
    got = ops.cpu_linear_int8_static(x, w, xs, xz, w_sum, ws, bias, -128, 127)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("group", "symmetric"), [(32, False), (64, True), (-1, False), (-1, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_weight_paths_match_the_reference(
    compile_mode: str, group: int, symmetric: bool, dtype: torch.dtype
):
    gen = torch.Generator().manual_seed(2)
    n, k = 48, 192
    groups = 1 if group == -1 else k // group
    q = pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen))
    scale = torch.rand(n, groups, generator=gen) * 1e-2 + 1e-3
    zp = None if symmetric else torch.randint(-4, 4, (n, groups), dtype=torch.int8, generator=gen)
    bias = torch.randn(n, generator=gen)
    packed, sz, kgroup = cpu_kernels.prepare_int4(q, scale, zp, group, dtype)
    assert kgroup == (64 if group == -1 else group)  # per channel: the largest group dividing K
    x = torch.randn(3, 5, k, generator=gen).to(dtype)
    ref = ops.linear_w4a16(x, q, scale, zp, group, bias)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 scales / zeros
    for threshold in (0, 1000):  # dequantize + mm, then the int4pack kernel
        got = ops.cpu_linear_int4_weight(x, packed, sz, q, kgroup, bias, threshold)
        assert got.dtype == dtype and got.shape == ref.shape
        assert rel_err(got, ref) < tol


def test_int4_preparation_refuses_what_the_kernel_cannot_take():
    q = pack_int4(torch.zeros(24, 96, dtype=torch.int8))
    with pytest.raises(ValueError, match="N % 16"):
        cpu_kernels.prepare_int4(q, torch.ones(24, 3), None, 32, torch.bfloat16)
    assert cpu_kernels.int4_group_for(96, 96) is None
    assert cpu_kernels.int4_group_for(576, -1) == 64
    assert cpu_kernels.int4_group_for(100, -1) is None


def test_int8_weight_matches_the_reference():
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=gen)
    s = torch.rand(32, generator=gen) * 1e-2
    x = torch.randn(4, 64, generator=gen)
    ref = ops.linear_w8a16(x, w, s[:, None], None, -1, None)
    torch.testing.assert_close(ops.cpu_linear_int8_weight(x, w, s, None), ref)


def test_kernel_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(4)
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8, generator=gen)
    ws = torch.rand(16, generator=gen)
    x = torch.randn(3, 64, generator=gen)
    torch.library.opcheck(ops.cpu_linear_int8_dynamic, (x, w, ws, None, -128, 127))
    torch.library.opcheck(ops.cpu_linear_int8_dynamic, (x, w, ws, None, -128, 127, "onednn"))
    torch.library.opcheck(ops.cpu_linear_int8_weight, (x, w, ws, None))
    sign_scale = torch.ones(64) / 8
    torch.library.opcheck(
        ops.cpu_linear_int8_dynamic_hadamard, (x, sign_scale, w, ws, None, -128, 127)
    )


def test_online_rotation_runs_inside_the_kernel_op(monkeypatch: pytest.MonkeyPatch):
    """quarot's run-time Hadamard on down_proj moves into the int8 kernel op (no wrapper left)."""
    from slimc.nn import HadamardInputRotation

    monkeypatch.setenv("SLIMC_CPU_COMPILE", "0")
    pipeline = "quarot{online-inputs=down_proj},w8a8-dynamic"
    model = tiny_llama(seed=0, layers=2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    reference = slimc.compile(model, pipeline, progress=False)
    lowered = slimc.compile(model, f"{pipeline},lower-cpu{{int8-engine=onednn}}", progress=False)
    rotated = [m for m in lowered.modules() if getattr(m, "kernel", "") == "cpu.hadamard+onednn"]
    assert [m.op_name for m in rotated] == ["slimc::cpu_linear_int8_dynamic_hadamard"] * 2
    assert not any(isinstance(m, HadamardInputRotation) for m in lowered.modules())
    graph = lowered.slimc_program.graph
    assert not any(n.target is ops.hadamard.default for n in graph.nodes)
    stats = lowered.slimc_program.statistics["lower-cpu"]
    assert stats["lowered linears (cpu.hadamard+onednn)"] == 2
    with torch.inference_mode():
        assert rel_err(lowered(ids).logits, reference(ids).logits) < 1e-5


@pytest.mark.parametrize(
    ("pipeline", "lowering", "kernel", "tol"),
    [
        ("w8a8-dynamic", "lower-cpu{int8-engine=onednn}", "cpu.onednn", 1e-5),
        ("w8a8-dynamic", "lower-cpu{int8-engine=int_mm}", "cpu.int_mm", 1e-5),
        ("w4a8", "lower-cpu{int8-engine=onednn}", "cpu.onednn", 1e-5),
        ("w4a8", "lower-cpu{int8-engine=int_mm}", "cpu.int_mm", 1e-5),
        ("w4a16{group-size=32}", "lower-cpu", "cpu.int4pack_mm", 1e-2),
        ("w4a16", "lower-cpu", "cpu.int4pack_mm", 1e-2),
        ("w8a16{symmetric=true}", "lower-cpu", "cpu.int8pack_mm", 1e-2),
    ],
)
def test_lowered_model_runs_kernels_and_matches_the_reference_path(
    pipeline: str, lowering: str, kernel: str, tol: float, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("SLIMC_CPU_COMPILE", "0")
    model = tiny_llama(seed=0, layers=2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    reference = slimc.compile(model, pipeline, progress=False)
    lowered = slimc.compile(model, f"{pipeline},{lowering}", progress=False)
    kernels = [m for m in lowered.modules() if isinstance(m, KernelLinear)]
    assert len(kernels) == 14 and {m.kernel for m in kernels} == {kernel}
    stats = lowered.slimc_program.statistics["lower-cpu"]
    assert stats[f"lowered linears ({kernel})"] == 14
    with torch.inference_mode():
        assert rel_err(lowered(ids).logits, reference(ids).logits) < tol


def test_linears_no_kernel_takes_stay_fused(monkeypatch: pytest.MonkeyPatch):
    """Asymmetric W8A16 has no native kernel: it keeps the reference op and is counted."""
    monkeypatch.setenv("SLIMC_CPU_COMPILE", "0")
    lowered = slimc.compile(
        tiny_llama(seed=0, layers=1), "w8a16{symmetric=false},lower-cpu", progress=False
    )
    assert lowered.slimc_program.statistics["lower-cpu"]["left fused (reference kernels)"] == 7
    assert not any(isinstance(m, KernelLinear) for m in lowered.modules())


def test_kernel_linear_skips_the_dispatcher_only_in_plain_eager(monkeypatch: pytest.MonkeyPatch):
    """Eager calls run the op's body directly; export (and so pt2 saving) still sees the op."""
    monkeypatch.setenv("SLIMC_CPU_COMPILE", "0")
    lowered = slimc.compile(tiny_llama(seed=0, layers=1), "w8a8-dynamic,lower-cpu", progress=False)
    linear = next(m for m in lowered.modules() if isinstance(m, KernelLinear))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    args = [getattr(linear, v) if kind == "buffer" else v for kind, v in linear.arg_spec]
    calls = []
    device_type, body = slimc.kernel.eager_impl("slimc::cpu_linear_int8_dynamic")
    assert device_type == "cpu"

    def counting_body(*a):
        calls.append(1)
        return body(*a)

    monkeypatch.setitem(
        slimc.kernel._EAGER_IMPLS, "slimc::cpu_linear_int8_dynamic", ("cpu", counting_body)
    )
    with torch.inference_mode():
        eager = linear(x)
    assert calls == [1]
    assert torch.equal(eager, torch.ops.slimc.cpu_linear_int8_dynamic(x, *args))
    exported = torch.export.export(linear, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.slimc.cpu_linear_int8_dynamic.default] and calls == [1]
    x.requires_grad_(True)  # autograd goes through the op (which refuses to differentiate)
    with pytest.raises(RuntimeError, match="autograd"):
        linear(x).sum().backward()
    assert calls == [1]
