"""NPU lowering: torch_npu op emulations, slimc::npu_linear_* kernel ops and `lower-npu` end to end."""

from __future__ import annotations

import types

import pytest
import torch

import slimc
import slimc.kernels.npu  # noqa: F401  (registers the kernel ops)
import slimc.ops  # noqa: F401
from slimc.kernels.npu import emulate as emu
from slimc.kernels.npu import layout
from slimc.kernels.npu import ops as npu_ops
from slimc.nn import KernelLinear, QuantizedLinear
from slimc.ops import pack_int4
from tests.models import tiny_llama, tiny_mlp, tiny_opt

ops = torch.ops.slimc
K, N, M = 64, 24, 5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape=(2, M, K), seed=0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * 2 + 0.3).to(dtype)


def _q(shape, lo, hi, seed=1) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8, generator=_gen(seed))


def _scale(shape, seed=2) -> torch.Tensor:
    return torch.rand(shape, generator=_gen(seed)) * 0.02 + 0.001


def _bias(seed=3) -> torch.Tensor:
    return torch.randn(N, generator=_gen(seed))


# ------------------------------------------------------------------ emulations of torch_npu ops


def test_int4pack_bit_layout_and_round_trip():
    row = torch.tensor([[1, -1, 2, -2, 3, -3, 7, -8]], dtype=torch.int32)
    word = emu.emulate_npu_convert_weight_to_int4pack(row)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert int(word) & 0xFFFFFFFF == 0x87D3E2F1  # element j in bits 4j..4j+3, two's complement
    w = torch.randint(-8, 8, (K, N), dtype=torch.int32, generator=_gen(4))
    packed = emu.emulate_npu_convert_weight_to_int4pack(w)
    assert packed.shape == (K, N // 8)
    assert torch.equal(emu.unpack_int4pack(packed), w.to(torch.int8))
    with pytest.raises(ValueError, match="divisible by 8"):
        emu.emulate_npu_convert_weight_to_int4pack(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        emu.emulate_npu_convert_weight_to_int4pack(torch.full((1, 8), 9, dtype=torch.int32))


def test_trans_quant_param_encoding():
    scale = torch.tensor([0.0123456789, 1.5, 3e-5])
    enc = emu.emulate_npu_trans_quant_param(scale, torch.tensor([3.0, -2.0, 0.0]))
    assert enc.dtype == torch.int64
    bits = scale.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(enc & 0xFFFFFFFF, bits & 0xFFFFE000)
    assert torch.all((enc >> 46) & 1 == 1)
    assert ((enc >> 37) & 0x1FF).tolist() == [3, (-2) & 0x1FF, 0]
    decoded = emu.decode_quant_scale(emu.emulate_npu_trans_quant_param(scale))
    torch.testing.assert_close(decoded, scale, rtol=2**-10, atol=0)  # 10 mantissa bits kept
    assert decoded[1] == 1.5


@pytest.mark.parametrize("qrange", [(-128, 127), (-8, 7)])
def test_dynamic_quant_matches_quantize_per_token(qrange):
    x = _x()
    q_ref, s_ref = ops.quantize_per_token(x, *qrange)
    dst = torch.quint4x2 if qrange[1] == 7 else None
    q, s = emu.emulate_npu_dynamic_quant(x, dst_type=dst)
    if dst is not None:
        assert q.dtype == torch.int32 and q.shape == (2, M, K // 8)
        q = emu.unpack_int4pack(q)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref.squeeze(-1))


@pytest.mark.parametrize("zp", [None, 7])
def test_quantize_div_mode_matches_quantize_affine(zp):
    x = _x()
    scale = torch.tensor([0.037])
    zero = None if zp is None else torch.tensor([zp], dtype=torch.int32)
    ref = ops.quantize_affine(x, [-1, -1, -1], scale, zero, -128, 127, torch.int8)
    got = emu.emulate_npu_quantize(x, scale, zero, torch.qint8, -1, True)
    assert torch.equal(got, ref)


def test_quant_matmul_int32_bias_offset_and_int8_output():
    a, b = _q((M, K), -128, 127, 5), _q((K, N), -128, 127, 6)
    acc = a.to(torch.int64) @ b.to(torch.int64)
    qb = torch.randint(-1000, 1000, (N,), dtype=torch.int32, generator=_gen(7))
    s = _scale(N)
    out = emu.emulate_npu_quant_matmul(a, b, s, bias=qb, output_dtype=torch.float32)
    torch.testing.assert_close(out, (acc + qb).to(torch.float32) * s)
    off = torch.full((N,), 2.0)
    y8 = emu.emulate_npu_quant_matmul(a, b, s * 1e-3, offset=off)
    assert y8.dtype == torch.int8
    assert torch.equal(
        y8, torch.clamp(torch.round(acc.float() * s * 1e-3 + 2.0), -128, 127).to(torch.int8)
    )


# ------------------------------------------------------------------ kernel ops vs slimc reference


def _dynamic_case(bits: int, act_bits: int, bias: bool):
    x = _x()
    lo, hi = (-8, 7) if bits == 4 else (-127, 127)
    q = _q((N, K), lo, hi)
    s = _scale((N, 1))
    b = _bias() if bias else None
    qmin, qmax = (-8, 7) if act_bits == 4 else (-128, 127)
    xq, xs = ops.quantize_per_token(x, qmin, qmax)
    if bits == 4:
        ref = ops.linear_w4a8(xq, xs, pack_int4(q), s, b, x.dtype)
    else:
        ref = ops.linear_w8a8(xq, xs, None, q, s, b, x.dtype)
    return x, q, s, b, ref


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("bits", "act_bits"), [(8, 8), (4, 8), (4, 4)])
def test_dynamic_kernel_ops_match_reference(bits, act_bits, bias):
    x, q, s, b, ref = _dynamic_case(bits, act_bits, bias)
    if act_bits == 4:
        op, weight = ops.npu_linear_w4a4_dynamic, layout.int4pack_kn(pack_int4(q))
    elif bits == 4:
        op, weight = ops.npu_linear_w4a8_dynamic, layout.int8_kn(pack_int4(q), 4)
    else:
        op, weight = ops.npu_linear_w8a8_dynamic, layout.int8_kn(q, 8)
    args = (x, weight, s.reshape(-1), b)
    torch.testing.assert_close(op(*args), ref, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("zp", [None, -5])
def test_static_w8a8_kernel_op_matches_reference(zp, bias):
    x = _x()
    q = _q((N, K), -127, 127)
    s, xs = _scale((N, 1)), torch.tensor([0.04])
    xz = None if zp is None else torch.tensor([zp], dtype=torch.int32)
    b = _bias() if bias else None
    xq = ops.quantize_affine(x, [-1, -1, -1], xs, xz, -128, 127, torch.int8)
    ref = ops.linear_w8a8(xq, xs, xz, q, s, b, x.dtype)
    w = layout.int8_kn(q, 8)
    deq = layout.deq_scale(xs, s, x.dtype)
    qbias = layout.quant_bias(w, xz, b, deq)
    assert (qbias is None) == (zp is None and not bias)
    offset = torch.zeros(1, dtype=torch.int32) if xz is None else xz
    args = (x, xs, offset, w, deq, qbias)
    got = ops.npu_linear_w8a8(*args)
    # Only the float bias is rounded (to a multiple of deq_scale): at most half a step.
    atol = (deq.max().item() / 2 if bias else 0) + 1e-5
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=atol)
    torch.library.opcheck(ops.npu_linear_w8a8, args)


def test_static_w8a8_float16_uses_int64_deq_scale():
    x = _x(dtype=torch.float16)
    q, s, xs = _q((N, K), -127, 127), _scale((N, 1)), torch.tensor([0.04])
    xq = ops.quantize_affine(x, [-1, -1, -1], xs, None, -128, 127, torch.int8)
    ref = ops.linear_w8a8(xq, xs, None, q, s, None, x.dtype)
    deq = layout.deq_scale(xs, s, torch.float16)
    assert deq.dtype == torch.int64
    w = layout.int8_kn(q, 8)
    got = ops.npu_linear_w8a8(x, xs, torch.zeros(1, dtype=torch.int32), w, deq, None)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref.float(), rtol=3e-3, atol=3e-3)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group", [-1, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_kernel_ops_match_reference(bits, symmetric, group, bias):
    x = _x()
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    q = _q((N, K), lo, hi)
    g = 1 if group == -1 else K // group
    s = _scale((N, g))
    zp = None if symmetric else _q((N, g), lo, hi, seed=9)
    b = _bias() if bias else None
    if bits == 4:
        ref = ops.linear_w4a16(x, pack_int4(q), s, zp, group, b)
        op, w = ops.npu_linear_w4a16, layout.int4pack_kn(pack_int4(q))
    else:
        ref = ops.linear_w8a16(x, q, s, zp, group, b)
        op, w = ops.npu_linear_w8a16, layout.int8_kn(q, 8)
    scale_gn, offset_gn = layout.antiquant_params(s, zp, x.dtype)
    assert scale_gn.shape == (g, N)
    if zp is not None:
        assert torch.equal(offset_gn, -zp.float().t())  # the op ADDS the offset
    args = (x, w, scale_gn, offset_gn, max(group, 0), b)
    torch.testing.assert_close(op(*args), ref, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(op, args)


def test_npu_path_calls_torch_npu_with_the_documented_arguments(monkeypatch):
    """With torch_npu present, the ops call its functions; here they are the emulations."""
    fake = types.SimpleNamespace(
        npu_dynamic_quant=emu.emulate_npu_dynamic_quant,
        npu_quant_matmul=emu.emulate_npu_quant_matmul,
        npu_quantize=emu.emulate_npu_quantize,
        npu_weight_quant_batchmatmul=emu.emulate_npu_weight_quant_batchmatmul,
    )
    x = _x(dtype=torch.bfloat16)
    q, s = _q((N, K), -127, 127), _scale((N, 1))
    w = layout.int8_kn(q, 8)
    emulated = [
        ops.npu_linear_w8a8_dynamic(x, w, s.reshape(-1), None),
        ops.npu_linear_w8a16(x, w, s.t().to(x.dtype), None, 0, None),
    ]
    monkeypatch.setattr(npu_ops, "torch_npu_for", lambda t: fake)
    on_npu = [
        ops.npu_linear_w8a8_dynamic(x, w, s.reshape(-1), None),
        ops.npu_linear_w8a16(x, w, s.t().to(x.dtype), None, 0, None),
    ]
    for a, b in zip(emulated, on_npu, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        ops.npu_linear_w8a8_dynamic(x.float(), w, s.reshape(-1), None)


def test_no_npu_means_emulation():
    assert npu_ops.torch_npu_for(torch.zeros(1)) is None


# ------------------------------------------------------------------ lower-npu end to end

CALIB = [torch.randint(0, 128, (1, 16), generator=_gen(i)) for i in range(2)]
IDS = torch.randint(0, 128, (2, 12), generator=_gen(77))


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0, layers=2)


@pytest.mark.parametrize(
    "pipeline",
    [
        "w8a8-dynamic",
        "w8a8",
        "w8a16",
        "w8a16{group-size=32 symmetric=false}",
        "w4a16",
        "w4a16{group-size=32 symmetric=true}",
        "w4a8",
        "w4a4",
    ],
)
def test_lowered_model_matches_fused_model(llama, pipeline):
    fused = slimc.compile(llama, pipeline, calib=CALIB, progress=False)
    lowered = slimc.compile(llama, pipeline + ",lower-npu", calib=CALIB, progress=False)
    kernels = [m for m in lowered.modules() if isinstance(m, KernelLinear)]
    assert len(kernels) == 14 and not any(isinstance(m, QuantizedLinear) for m in lowered.modules())
    assert {m.kernel for m in kernels} <= {"npu.quant_matmul", "npu.weight_quant_batchmatmul"}
    assert lowered.slimc_program.stage.label == "kernel"
    with torch.no_grad():
        want, got = fused(IDS).logits, lowered(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_static_w8a8_with_biases_matches_within_quant_bias_rounding():
    model = tiny_opt(seed=0, layers=2)
    fused = slimc.compile(model, "w8a8", calib=CALIB, progress=False)
    lowered = slimc.compile(model, "w8a8,lower-npu", calib=CALIB, progress=False)
    with torch.no_grad():
        want, got = fused(IDS).logits, lowered(IDS).logits
    err = (got - want).abs().max().item()
    assert err < 2e-2 * want.abs().max().item()


def test_unlowerable_linear_stays_fused_or_fails_when_strict():
    model = tiny_mlp(seed=0, hidden=64, intermediate=36)  # N=36: no int4pack along N
    x = model.example_inputs()
    loose = slimc.compile(model, "w4a16,lower-npu", example_inputs=x, progress=False)
    kinds = [type(m).__name__ for m in (loose.fc1, loose.fc2)]
    assert kinds == ["QuantizedLinear", "KernelLinear"]
    assert loose.slimc_program.statistics["lower-npu"]["left fused (reference kernels)"] == 1
    fused = slimc.compile(model, "w4a16", example_inputs=x, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(loose(*x), fused(*x), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="fc1: int4 packing needs N divisible by 8, got N=36"):
        slimc.compile(model, "w4a16,lower-npu{strict=true}", example_inputs=x, progress=False)
