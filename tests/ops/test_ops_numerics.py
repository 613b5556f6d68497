"""Numerical behaviour of the slimc:: reference ops, packing helpers and fake impls under export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimc.ops  # noqa: F401  (registers the ops)
from slimc.ops import block_grid_shape, expand_blocks, pack_int4, unpack_int4

ops = torch.ops.slimc


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("shape", "block", "grid"),
    [
        ((2, 3, 8), [-1, -1, -1], [1, 1, 1]),
        ((2, 3, 8), [1, 1, -1], [2, 3, 1]),
        ((24, 48), [1, -1], [24, 1]),
        ((24, 48), [1, 16], [24, 3]),
        ((24, 48), [8, 16], [3, 3]),
    ],
)
def test_block_grid_shapes(shape, block, grid):
    x = torch.randn(shape)
    scale, zp = ops.choose_qparams_affine(x, block, -128, 127, False)
    assert list(scale.shape) == grid == block_grid_shape(shape, block)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert expand_blocks(scale, shape, block).shape == x.shape


@pytest.mark.parametrize("block", [[-1, -1], [1, -1], [1, 16], [4, 8]])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (-8, 7)])
def test_quant_dequant_error_bounded(block, symmetric, qmin, qmax):
    x = torch.randn(24, 48) * 2 + 0.3
    scale, zp = ops.choose_qparams_affine(x, block, qmin, qmax, symmetric)
    zp_arg = None if symmetric else zp
    q = ops.quantize_affine(x, block, scale, zp_arg, qmin, qmax, torch.int8)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    if symmetric:
        assert not zp.any()
    else:
        assert int(zp.min()) >= qmin and int(zp.max()) <= qmax
    xd = ops.dequantize_affine(q, block, scale, zp_arg, qmin, qmax, torch.float32)
    full_scale = expand_blocks(scale, x.shape, block)
    assert torch.all((xd - x).abs() <= full_scale / 2 + 1e-6)


def test_choose_qparams_values():
    x = torch.tensor([[-1.0, 3.0], [2.0, 4.0]])
    scale, zp = ops.choose_qparams_affine(x, [1, -1], -128, 127, False)
    torch.testing.assert_close(scale, torch.tensor([[4.0 / 255], [4.0 / 255]]))
    # row 1: min clamped to 0, so zero maps to qmin
    assert zp.flatten().tolist() == [-128 + round(255 / 4), -128]
    scale, zp = ops.choose_qparams_affine(x, [-1, -1], -128, 127, True)
    torch.testing.assert_close(scale, torch.tensor([[4.0 / 127]]))
    scale, _ = ops.choose_qparams_affine(torch.zeros(2, 4), [1, -1], -128, 127, True)
    assert torch.all(scale == torch.finfo(torch.float32).eps)


def test_quantize_per_token():
    x = torch.randn(2, 5, 32)
    x[0, 0] = 0.0
    q, scale = ops.quantize_per_token(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 5, 1) and scale.dtype == torch.float32
    expected = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(scale, expected)
    assert torch.equal(q.abs().amax(-1)[1:], torch.full_like(q.abs().amax(-1)[1:], 127))
    assert torch.all((q.float() * scale - x).abs() <= scale / 2 + 1e-6)
    ref = ops.quantize_affine(x, [1, 1, -1], scale, None, -128, 127, torch.int8)
    assert torch.equal(q, ref)


def _dequant_rows(q, scale, zp=None):
    q = q.float()
    if zp is not None:
        q = q - zp.float()
    return q * scale


@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 3)])
@pytest.mark.parametrize("mode", ["static", "static_zp", "token"])
def test_linear_w8a8_matches_float(lead, mode):
    x = torch.randn(*lead, 48) * 4 + 1
    w = torch.randn(24, 48)
    bias = torch.randn(24)
    w_scale, _ = ops.choose_qparams_affine(w, [1, -1], -128, 127, True)
    qw = ops.quantize_affine(w, [1, -1], w_scale, None, -128, 127, torch.int8)
    if mode == "token":
        xq, x_scale = ops.quantize_per_token(x)
        x_zp = None
    else:
        x_scale, x_zp = ops.choose_qparams_affine(x, [-1] * x.dim(), -128, 127, mode == "static")
        x_zp = None if mode == "static" else x_zp
        xq = ops.quantize_affine(x, [-1] * x.dim(), x_scale, x_zp, -128, 127, torch.int8)
    if mode == "static_zp":
        assert int(x_zp.flatten()[0]) != 0
    out = ops.linear_w8a8(xq, x_scale, x_zp, qw, w_scale, bias, torch.float32)
    if x_scale.numel() == 1:  # per tensor: broadcast as a scalar
        x_scale = x_scale.reshape(())
    x_deq = _dequant_rows(xq, x_scale, None if x_zp is None else x_zp.reshape(()))
    ref = F.linear(x_deq.double(), _dequant_rows(qw, w_scale).double(), bias.double()).float()
    assert out.shape == (*lead, 24)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_linear_w8a8_zero_point_exceeding_int8():
    xq = torch.full((2, 16), -128, dtype=torch.int8)
    qw = torch.full((3, 16), 127, dtype=torch.int8)
    zp = torch.tensor([127], dtype=torch.int32)  # xq - zp = -255, outside int8
    out = ops.linear_w8a8(xq, torch.tensor([1.0]), zp, qw, torch.ones(3, 1), None, torch.float32)
    assert torch.all(out == -255.0 * 127 * 16)


def test_linear_w4a8_matches_float():
    x = torch.randn(5, 64)
    q4 = torch.randint(-8, 8, (24, 64), dtype=torch.int8)
    w_scale = torch.rand(24, 1) * 0.1
    xq, x_scale = ops.quantize_per_token(x)
    out = ops.linear_w4a8(xq, x_scale, pack_int4(q4), w_scale, None, torch.float32)
    ref = F.linear(_dequant_rows(xq, x_scale).double(), _dequant_rows(q4, w_scale).double()).float()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("group_size", "symmetric"), [(-1, True), (16, False), (32, True)])
def test_linear_w4a16_matches_unpacked(group_size, symmetric):
    w = torch.randn(24, 64)
    block = [1, -1 if group_size == -1 else group_size]
    scale, zp = ops.choose_qparams_affine(w, block, -8, 7, symmetric)
    zp_arg = None if symmetric else zp.to(torch.int8)
    q = ops.quantize_affine(w, block, scale, zp_arg, -8, 7, torch.int8)
    x = torch.randn(3, 7, 64)
    bias = torch.randn(24)
    out = ops.linear_w4a16(x, pack_int4(q), scale, zp_arg, group_size, bias)
    q_rt = unpack_int4(pack_int4(q))
    w_deq = ops.dequantize_affine(q_rt, block, scale, zp_arg, -8, 7, torch.float32)
    torch.testing.assert_close(out, F.linear(x, w_deq, bias))
    assert (w_deq - w).abs().max() <= scale.max() / 2 + 1e-6
    out8 = ops.linear_w8a16(x, q, scale, zp_arg, group_size, bias)
    torch.testing.assert_close(out8, out)


def test_linear_w8a16_keeps_activation_dtype():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    q = torch.randint(-128, 128, (8, 32), dtype=torch.int8)
    out = ops.linear_w8a16(x, q, torch.rand(8, 1), None, -1, torch.randn(8))
    assert out.dtype == torch.bfloat16 and out.shape == (4, 8)


def test_pack_unpack_roundtrip():
    q = torch.randint(-8, 8, (5, 10), dtype=torch.int8)
    q[0, 0], q[0, 1], q[1, 0], q[1, 1] = -8, 7, 7, -8
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 5)
    assert torch.equal(unpack_int4(packed), q)
    # low nibble holds the even k: (-8 + 8) | (7 + 8) << 4
    assert int(packed[0, 0]) == 0xF0 and int(packed[1, 0]) == 0x0F


def test_pack_errors():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((2, 4), 8, dtype=torch.int8))


def test_non_dividing_block_size_errors():
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match="dim 1"):
        ops.choose_qparams_affine(x, [1, 20], -128, 127, True)
    with pytest.raises(ValueError, match="dim 0"):
        ops.quantize_affine(x, [3, -1], torch.ones(1, 1), None, -128, 127, torch.int8)
    with pytest.raises(ValueError, match="one entry per dim"):
        ops.choose_qparams_affine(x, [-1], -128, 127, True)
    with pytest.raises(ValueError, match="group_size=20"):
        ops.linear_w8a16(x, torch.zeros(8, 48, dtype=torch.int8), torch.ones(8, 2), None, 20, None)


class _DynamicW8A8(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(24, 48)
        self.register_buffer("w_scale", w.abs().amax(1, keepdim=True) / 127)
        self.register_buffer("qw", torch.round(w / self.w_scale).to(torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = torch.ops.slimc.quantize_per_token(x)
        return torch.ops.slimc.linear_w8a8(xq, x_scale, None, self.qw, self.w_scale, None, x.dtype)


class _StaticAffine(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = torch.ops.slimc.choose_qparams_affine(x, [1, 1, 16], -128, 127, False)
        q = torch.ops.slimc.quantize_affine(x, [1, 1, 16], scale, zp, -128, 127, torch.int8)
        return torch.ops.slimc.dequantize_affine(q, [1, 1, 16], scale, zp, -128, 127, torch.float32)


def _targets(ep: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_export_dynamic_batch():
    m = _DynamicW8A8()
    x = torch.randn(4, 48)
    ep = torch.export.export(m, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    assert {"slimc.quantize_per_token.default", "slimc.linear_w8a8.default"} <= _targets(ep)
    out_meta = [n for n in ep.graph.nodes if n.op == "output"][0].args[0][0].meta["val"]
    assert isinstance(out_meta.shape[0], torch.SymInt) and out_meta.shape[1] == 24
    x7 = torch.randn(7, 48)
    torch.testing.assert_close(ep.module()(x7), m(x7))


def test_export_dim_auto_affine():
    x = torch.randn(3, 5, 32)
    dynamic_shapes = {"x": {0: torch.export.Dim.AUTO}}
    ep = torch.export.export(_StaticAffine(), (x,), dynamic_shapes=dynamic_shapes)
    targets = _targets(ep)
    for name in ("choose_qparams_affine", "quantize_affine", "dequantize_affine"):
        assert f"slimc.{name}.default" in targets
    x2 = torch.randn(6, 5, 32)
    torch.testing.assert_close(ep.module()(x2), _StaticAffine()(x2))
