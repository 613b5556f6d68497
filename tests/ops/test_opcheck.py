"""torch.library.opcheck over every slimc:: op with representative sample inputs."""

from __future__ import annotations

import pytest
import torch

import slimc.ops  # noqa: F401  (registers the ops)
from slimc.ops import pack_int4

ops = torch.ops.slimc
K, N = 48, 24


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed=0, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, dtype=torch.int8, generator=_gen(seed))


def _randn(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=_gen(seed)).to(dtype)


# (x shape, block_size, symmetric, dequantized dtype)
AFFINE_CASES = [
    ((3, 5, K), [-1, -1, -1], False, torch.float32),  # per tensor, asymmetric
    ((3, 5, K), [-1, -1, -1], True, torch.bfloat16),
    ((3, 5, K), [1, 1, -1], True, torch.float32),  # per token
    ((N, K), [1, -1], True, torch.float32),  # per channel
    ((N, K), [1, -1], False, torch.bfloat16),
    ((N, K), [1, 16], False, torch.float32),  # per group
    ((1, K), [1, -1], False, torch.float32),
    ((17, K), [1, 8], True, torch.float16),
]


@pytest.mark.parametrize(("shape", "block", "symmetric", "out_dtype"), AFFINE_CASES)
def test_affine_ops(shape, block, symmetric, out_dtype):
    x = _randn(shape, 1) * 3 + 0.5
    qmin, qmax = -128, 127
    torch.library.opcheck(ops.choose_qparams_affine, (x, block, qmin, qmax, symmetric))
    scale, zp = ops.choose_qparams_affine(x, block, qmin, qmax, symmetric)
    zp_arg = None if symmetric else zp
    torch.library.opcheck(ops.quantize_affine, (x, block, scale, zp_arg, qmin, qmax, torch.int8))
    q = ops.quantize_affine(x, block, scale, zp_arg, qmin, qmax, torch.int8)
    torch.library.opcheck(ops.dequantize_affine, (q, block, scale, zp_arg, qmin, qmax, out_dtype))


def test_affine_int4_range():
    x = _randn((N, K), 2)
    torch.library.opcheck(ops.choose_qparams_affine, (x, [1, 16], -8, 7, False, 1e-6))
    scale, zp = ops.choose_qparams_affine(x, [1, 16], -8, 7, False)
    torch.library.opcheck(ops.quantize_affine, (x, [1, 16], scale, zp, -8, 7, torch.int8))


@pytest.mark.parametrize(
    ("shape", "qrange"), [((1, K), ()), ((3, K), (-127, 127)), ((17, K), ()), ((2, 3, K), (-8, 7))]
)
def test_quantize_per_token(shape, qrange):
    torch.library.opcheck(ops.quantize_per_token, (_randn(shape, 3), *qrange))


# (leading dims, bias, activation quantization, out dtype)
W8A8_CASES = [
    ((1,), False, "static", torch.float32),
    ((3,), True, "static_zp", torch.float32),
    ((17,), True, "token", torch.bfloat16),
    ((2, 3), False, "token", torch.float32),
    ((2, 3), True, "static_zp", torch.bfloat16),
    ((17,), False, "static_zp", torch.float16),
]


@pytest.mark.parametrize(("lead", "with_bias", "act", "out_dtype"), W8A8_CASES)
def test_linear_w8a8(lead, with_bias, act, out_dtype):
    xq = _int8((*lead, K), 5)
    w = _int8((N, K), 6)
    w_scale = torch.rand(N, 1, generator=_gen(7)) * 0.01 + 1e-3
    bias = _randn((N,), 8) if with_bias else None
    if act == "token":
        x_scale, x_zp = torch.rand((*lead, 1), generator=_gen(9)) * 0.1 + 1e-3, None
    else:
        x_scale = torch.tensor([0.05]).reshape([1] * (len(lead) + 1))
        x_zp = torch.tensor([3], dtype=torch.int32) if act == "static_zp" else None
    torch.library.opcheck(ops.linear_w8a8, (xq, x_scale, x_zp, w, w_scale, bias, out_dtype))


def _weight_only_args(bits: int, group_size: int, symmetric: bool, seed: int):
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = _int8((N, K), seed, lo, hi)
    groups = 1 if group_size == -1 else K // group_size
    scale = torch.rand(N, groups, generator=_gen(seed + 1)) * 0.01 + 1e-3
    zp = None if symmetric else _int8((N, groups), seed + 2, lo, hi)
    return (pack_int4(q) if bits == 4 else q), scale, zp


# (group_size, symmetric, leading dims, bias, activation dtype)
WEIGHT_ONLY_CASES = [
    (-1, True, (1,), False, torch.float32),
    (16, False, (17,), True, torch.float32),
    (24, True, (2, 3), True, torch.bfloat16),
    (-1, False, (3,), True, torch.float16),
]


@pytest.mark.parametrize(("op_name", "bits"), [("linear_w8a16", 8), ("linear_w4a16", 4)])
@pytest.mark.parametrize(("group_size", "symmetric", "lead", "with_bias", "dtype"), WEIGHT_ONLY_CASES)
def test_linear_weight_only(op_name, bits, group_size, symmetric, lead, with_bias, dtype):
    qw, scale, zp = _weight_only_args(bits, group_size, symmetric, 10)
    bias = _randn((N,), 11) if with_bias else None
    x = _randn((*lead, K), 12, dtype)
    args = (x, qw, scale, zp, group_size, bias)
    torch.library.opcheck(getattr(ops, op_name), args, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    ("lead", "with_bias", "out_dtype"),
    [((1,), False, torch.float32), ((17,), True, torch.float32), ((2, 3), True, torch.bfloat16)],
)
def test_linear_w4a8(lead, with_bias, out_dtype):
    xq = _int8((*lead, K), 13)
    qw = pack_int4(_int8((N, K), 14, -8, 8))
    x_scale = torch.rand((*lead, 1), generator=_gen(15)) * 0.1 + 1e-3
    w_scale = torch.rand(N, 1, generator=_gen(16)) * 0.1 + 1e-3
    bias = _randn((N,), 17) if with_bias else None
    torch.library.opcheck(ops.linear_w4a8, (xq, x_scale, qw, w_scale, bias, out_dtype))
