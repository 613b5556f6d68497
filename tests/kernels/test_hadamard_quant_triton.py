"""Fused Hadamard + per-token quantization: the slimc::hadamard_quantize_per_token reference,
the Triton kernel against it (power-of-two and Paley x Sylvester sizes), the op, selection.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/kernels/conftest.py
sets TRITON_INTERPRET=1); with one, the same tests run the compiled kernel on CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import slimc.ops  # noqa: E402, F401
from slimc.kernels import hadamard_quant as hq  # noqa: E402
from slimc.kernels.hadamard_quant.launcher import factor_matrix, hadamard_quantize  # noqa: E402
from slimc.rotate.hadamard import hadamard, random_signs, sylvester  # noqa: E402

ops = torch.ops.slimc
H100 = "NVIDIA H100 80GB HBM3"


def _x(m, n, dtype, device, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((*lead, m, n), generator=g)
    x[..., 5] *= 30.0  # an outlier channel, which the rotation spreads out
    if m >= 3:
        x[..., 1, :] = 0.0
    return x.to(dtype).to(device)


def _check(q, scale, x, signs, qmin=-128, qmax=127):
    """Codes equal to the reference except (rarely) one step off where the fp32 rotation and
    the float64 reference round differently; scales equal to a few fp32 ulps."""
    q_ref, s_ref = ops.hadamard_quantize_per_token(x.cpu(), signs.cpu(), qmin, qmax)
    assert q.dtype == torch.int8 and q.shape == q_ref.shape and scale.shape == s_ref.shape
    diff = (q.cpu().int() - q_ref.int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() <= 1e-3
    torch.testing.assert_close(scale.cpu(), s_ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("n", [12, 24, 64, 576, 1536])
def test_factor_matrix_kronecker(n):
    a = factor_matrix(n)
    m, p2 = hq.factor_orders(n)
    assert a.shape == (m, m) and m * p2 == n
    assert torch.equal(a @ a.t(), m * torch.eye(m, dtype=torch.float64))
    assert torch.equal(torch.kron(a, sylvester(p2)), hadamard(n))


def test_reference_op_is_the_composition():
    x = _x(3, 96, torch.bfloat16, "cpu")
    signs = random_signs(96)
    q, scale = ops.hadamard_quantize_per_token(x, signs, -128, 127)
    q_ref, s_ref = ops.quantize_per_token(ops.hadamard(x, signs), -128, 127)
    assert torch.equal(q, q_ref) and torch.equal(scale, s_ref)
    torch.library.opcheck(ops.hadamard_quantize_per_token.default, (x, signs, -128, 127))
    torch.library.opcheck(
        ops.triton_hadamard_quantize_per_token.default, (x, signs, -128, 127, hq.AUTO, [])
    )


# (n, m, dtype, block_m, use_dot): powers of two, Paley-only (12), Paley x Sylvester (24 =
# 12 x 2, 576 = 36 x 16, 1536 = 12 x 128, 5632 = 44 x 128); both m-factor paths.
CASES = [
    (64, 1, torch.float32, 1, 0),
    (128, 17, torch.bfloat16, 4, 0),
    (12, 3, torch.float32, 4, 1),
    (24, 17, torch.bfloat16, 2, 0),
    (576, 3, torch.float16, 1, 1),
    (576, 17, torch.float32, 4, 0),
    (1536, 3, torch.bfloat16, 2, 1),
    (1536, 1, torch.float32, 1, 0),
    (5632, 3, torch.float16, 1, 1),
]


@pytest.mark.parametrize(("n", "m", "dtype", "block_m", "use_dot"), CASES)
def test_fused_kernel_matches_reference(device, n, m, dtype, block_m, use_dot):
    x = _x(m, n, dtype, device)
    signs = random_signs(n).to(device)
    cfg = hq.fit_config({"block_m": block_m, "use_dot": use_dot, "num_warps": 4}, n, m)
    q, scale = hadamard_quantize(x, signs, -128, 127, hq.FUSED, cfg)
    _check(q, scale, x, signs)


def test_lead_dims_int4_range_and_auto(device):
    x = _x(3, 1536, torch.float32, device, lead=(2,))
    signs = random_signs(1536, seed=7).to(device)
    q, scale = hadamard_quantize(x, signs, -8, 7)  # "auto": table config
    _check(q, scale, x, signs, -8, 7)
    assert q.shape == (2, 3, 1536) and scale.shape == (2, 3, 1)
    assert q[:, 1].eq(0).all() and scale[:, 1].eq(torch.finfo(torch.float32).eps).all()


def test_rotated_int8_linear_op_runs_the_kernels(device):
    """`slimc::triton_linear_w8a8_hadamard`'s Triton path: fused rotate + quantize, int8 GEMM."""
    from slimc.kernels.hadamard_quant.ops import linear_w8a8_hadamard_triton

    n, k, m = 40, 96, 5
    x = _x(m, k, torch.float32, device, lead=(2,))
    signs = random_signs(k, seed=2).to(device)
    g = torch.Generator().manual_seed(4)
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(device)
    w_scale = (torch.rand(n, 1, generator=g) / 100).to(device)
    bias = torch.randn(n, generator=g).to(device)
    rk, rcfg = hq.select(k, 2 * m, "default")
    got = linear_w8a8_hadamard_triton(
        x, signs, qweight, w_scale, bias, -128, 127, rk, hq.config_values(rk, rcfg),
        "w8a8.auto", [], None,
    )  # fmt: skip
    xq, x_scale = ops.hadamard_quantize_per_token(x.cpu(), signs.cpu(), -128, 127)
    want = ops.linear_w8a8(
        xq, x_scale, None, qweight.cpu(), w_scale.cpu(), bias.cpu(), torch.float32
    )
    assert got.shape == (2, m, n) and got.dtype == torch.float32
    # a code one step off (see _check) moves an output by at most one weight row's scale
    tol = float(x_scale.max() * w_scale.max() * 127 * 2)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=tol)


def test_bad_inputs_are_named(device):
    x = _x(2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="signs must have shape"):
        hadamard_quantize(x, random_signs(32).to(device), -128, 127)
    with pytest.raises(ValueError, match="qmin=0"):
        hadamard_quantize(x, random_signs(64).to(device), 0, 127)
    with pytest.raises(ValueError, match="n = 92"):
        hq.select(92, 4, H100)  # no Paley / Sylvester construction of order 92 is known here


def test_selection_and_config_values():
    kernel, cfg = hq.select(4096, 1, H100)
    assert kernel == hq.FUSED and cfg["block_m"] == 1
    sel = hq.select_explained(5632, 4096, H100)
    m, p2 = hq.factor_orders(5632)
    assert (m, p2) == (44, 128) and "untuned" in sel.reason
    assert 64 * sel.config["block_m"] * p2 <= hq.dispatch.MAX_TILE and sel.config["use_dot"] == 1
    assert hq.fit_config({"block_m": 1, "use_dot": 1, "num_warps": 4}, 4096, 1)["use_dot"] == 0
    assert hq.select(4096, None, "cpu") == (hq.AUTO, {})
    assert hq.config_from_values(kernel, hq.config_values(kernel, cfg)) == cfg
    for kernel, cfg in hq.candidates(1536, 64):
        hq.FAMILY.check_config(kernel, cfg)
    with pytest.raises(ValueError, match="use_dot"):
        hq.config_values(hq.FUSED, {"block_m": 1, "use_dot": -1, "num_warps": 4})


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None, reason="no CUDA Triton backend"
)
def test_kernels_compile_for_hopper():
    """Triton's full compiler (to a cubin, with the bundled ptxas) for sm_90, also without a
    GPU: catches what the interpreter does not check. Runs in a subprocess without
    TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from slimc.kernels.w8a8.aot import compile_family; print(compile_family('hadamard_quant', 90))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sm_90" in proc.stdout
