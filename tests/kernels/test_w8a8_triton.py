"""W8A8 int8 Triton kernels against the slimc::quantize_per_token / quantize_affine / linear_w8a8
references, the kernel ops, and config tables / selection.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/kernels/conftest.py
sets TRITON_INTERPRET=1); with one, the same tests run the compiled kernels on CUDA. References
are always computed on CPU copies.
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
from slimc.kernels import w8a8  # noqa: E402
from slimc.kernels.w8a8 import launcher  # noqa: E402
from slimc.kernels.w8a8 import ops as w8a8_ops  # noqa: E402
from slimc.kernels.w8a8.tables import bucket_m  # noqa: E402

ops = torch.ops.slimc
H100 = "NVIDIA H100 80GB HBM3"
CFG = {"block_m": 16, "block_n": 16, "block_k": 32, "split_k": 1, "group_m": 2,
       "num_warps": 4, "num_stages": 1}  # fmt: skip
ULP = {torch.float32: 2**-22, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def _x(shape, dtype, device, seed=0):
    """Activations with a few outlier channels, an all-zero row when there are >= 3 rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 3] *= 20.0
    if x.reshape(-1, shape[-1]).shape[0] >= 3:
        x.reshape(-1, shape[-1])[1] = 0.0
    return x.to(dtype).to(device)


def _weights(n, k, device, seed=1, bias_dtype=None):
    g = torch.Generator().manual_seed(seed)
    qw = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand((n, 1), generator=g) * 0.01 + 1e-3
    b = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return tuple(None if t is None else t.to(device) for t in (qw, ws, b))


def _assert_close(out, ref):
    """Within one unit in the last place of the output dtype (fp32: a few), relative to the
    largest output (the GPU may contract the epilogue into FMAs)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = ULP[ref.dtype]
    out, ref = out.cpu().float(), ref.float()
    scale = ref.abs().max().item() + 1e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * scale)


# --------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("shape", [(1, 64), (3, 96), (17, 64), (2, 3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token_bit_exact(device, shape, dtype):
    x = _x(shape, dtype, device)
    q, scale = launcher.quantize_per_token(x, -128, 127)
    q_ref, s_ref = ops.quantize_per_token(x.cpu(), -128, 127)
    assert q.dtype == torch.int8 and scale.shape == (*shape[:-1], 1)
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(scale.cpu(), s_ref)


@pytest.mark.parametrize(("qmin", "qmax"), [(-127, 127), (-8, 7)])
def test_quantize_per_token_ranges_and_ties(device, qmin, qmax):
    """Exact half steps round to even, like torch.round; a narrow (int4) range clamps."""
    x = torch.tensor([[float(qmax), 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] * 8])
    q, scale = launcher.quantize_per_token(x.to(device), qmin, qmax)
    q_ref, s_ref = ops.quantize_per_token(x, qmin, qmax)
    assert scale.cpu().item() == 1.0  # absmax / qmax = 1: codes are round(x)
    assert torch.equal(q.cpu(), q_ref)
    assert q_ref[0, :8].tolist() == [qmax, 0, 2, 2, 0, -2, -2, 4]


@pytest.mark.parametrize("zp", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_static_bit_exact(device, zp, dtype):
    x = _x((5, 96), dtype, device)
    scale = torch.tensor([0.02], device=device)
    zero = None if zp is None else torch.tensor([zp], dtype=torch.int32, device=device)
    q = launcher.quantize_static(x, scale, zero, -128, 127)
    q_ref = ops.quantize_affine(x.cpu(), [-1, -1], scale.cpu(), _cpu(zero), -128, 127, torch.int8)
    assert torch.equal(q.cpu(), q_ref)


# --------------------------------------------------------------------------- GEMMs

# (m, n, k, dtype, bias): odd M, N = 40 / 24 not multiples of BLOCK_N, K = 96 a partial K step.
CASES = [
    (1, 40, 64, torch.float32, True),
    (3, 40, 96, torch.bfloat16, True),
    (17, 24, 64, torch.float16, False),
    (17, 40, 96, torch.float32, False),
]


@pytest.mark.parametrize(("m", "n", "k", "dtype", "bias"), CASES)
@pytest.mark.parametrize("kernel", [w8a8.GEMM, w8a8.FUSED])
@pytest.mark.parametrize("split", [1, 2])
def test_linear_dynamic_matches_reference(device, m, n, k, dtype, bias, kernel, split):
    x = _x((m, k), dtype, device)
    qw, ws, b = _weights(n, k, device, bias_dtype=dtype if bias else None)
    out = launcher.linear_dynamic(x, qw, ws, b, -128, 127, kernel, {**CFG, "split_k": split})
    xq, x_scale = ops.quantize_per_token(x.cpu(), -128, 127)
    ref = ops.linear_w8a8(xq, x_scale, None, qw.cpu(), ws.cpu(), _cpu(b), dtype)
    _assert_close(out, ref)


@pytest.mark.parametrize("zp", [None, -5])
@pytest.mark.parametrize("kernel", [w8a8.GEMM, w8a8.FUSED])
@pytest.mark.parametrize(("m", "split"), [(3, 1), (17, 2)])
def test_linear_static_matches_reference(device, zp, kernel, m, split):
    x = _x((m, 96), torch.bfloat16, device)
    qw, ws, b = _weights(40, 96, device, bias_dtype=torch.bfloat16)
    xs = torch.tensor([0.03], device=device)
    xz = None if zp is None else torch.tensor([zp], dtype=torch.int32, device=device)
    cfg = {**CFG, "split_k": split}
    out = launcher.linear_static(x, xs, xz, qw, ws, b, -128, 127, kernel, cfg)
    xq = ops.quantize_affine(x.cpu(), [-1, -1], xs.cpu(), _cpu(xz), -128, 127, torch.int8)
    ref = ops.linear_w8a8(xq, xs.cpu(), _cpu(xz), qw.cpu(), ws.cpu(), b.cpu(), torch.bfloat16)
    _assert_close(out, ref)


@pytest.mark.parametrize("per_token", [True, False])
def test_linear_w8a8_cuda_path_auto(device, per_token):
    """The CUDA kernel registered for slimc::linear_w8a8 (table-selected config), with 3-D x,
    a per-token or a per-tensor scale and zero point, and a float32 output."""
    qw, ws, b = _weights(40, 64, device, bias_dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    xq = torch.randint(-128, 128, (2, 3, 64), generator=g, dtype=torch.int8).to(device)
    if per_token:
        xs, xz = (torch.rand((2, 3, 1), generator=g) * 0.1).to(device), None
    else:
        xs, xz = torch.tensor([0.05], device=device), torch.tensor([7], device=device)
    out = w8a8_ops._linear_w8a8_cuda(xq, xs, xz, qw, ws, b, torch.float32)
    ref = ops.linear_w8a8(xq.cpu(), xs.cpu(), _cpu(xz), qw.cpu(), ws.cpu(), b.cpu(), torch.float32)
    _assert_close(out, ref)
    q, s = w8a8_ops._quantize_per_token_cuda(_x((3, 64), torch.float32, device), -128, 127)
    q_ref, s_ref = ops.quantize_per_token(_x((3, 64), torch.float32, "cpu"), -128, 127)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


def test_auto_kernel_and_empty_batch(device):
    qw, ws, _ = _weights(24, 64, device)
    x = _x((5, 64), torch.float32, device)
    out = launcher.linear_dynamic(x, qw, ws, None, -128, 127, w8a8.AUTO, {})
    xq, x_scale = ops.quantize_per_token(x.cpu(), -128, 127)
    _assert_close(out, ops.linear_w8a8(xq, x_scale, None, qw.cpu(), ws.cpu(), None, x.dtype))
    empty = launcher.linear_dynamic(x[:0], qw, ws, None, -128, 127, w8a8.GEMM, CFG)
    assert empty.shape == (0, 24)


def test_bad_operands_are_named(device):
    qw, ws, _ = _weights(24, 64, device)
    x = _x((2, 64), torch.float32, device)
    with pytest.raises(ValueError, match="qweight must be torch.int8"):
        launcher.linear_dynamic(x, qw.to(torch.int32), ws, None, -128, 127, w8a8.GEMM, CFG)
    with pytest.raises(ValueError, match="K=32"):
        launcher.linear_dynamic(x[:, :32], qw, ws, None, -128, 127, w8a8.GEMM, CFG)
    with pytest.raises(ValueError, match="block_n"):
        launcher.linear_dynamic(x, qw, ws, None, -128, 127, w8a8.GEMM, {**CFG, "block_n": 24})


# --------------------------------------------------------------------------- kernel ops


def test_kernel_ops_reference_and_opcheck():
    x = _x((3, 64), torch.float32, "cpu")
    qw, ws, b = _weights(24, 64, "cpu", bias_dtype=torch.float32)
    values = w8a8.config_values(w8a8.GEMM, CFG)
    out = ops.triton_linear_w8a8_dynamic(x, qw, ws, b, -128, 127, w8a8.GEMM, values)
    xq, x_scale = ops.quantize_per_token(x, -128, 127)
    assert torch.equal(out, ops.linear_w8a8(xq, x_scale, None, qw, ws, b, x.dtype))
    xs, xz = torch.tensor([0.05]), torch.tensor([2], dtype=torch.int32)
    out_s = ops.triton_linear_w8a8_static(x, xs, xz, qw, ws, b, -128, 127, w8a8.FUSED, values,
                                          torch.bfloat16)  # fmt: skip
    assert out_s.dtype == torch.bfloat16
    torch.library.opcheck(
        ops.triton_linear_w8a8_dynamic.default, (x, qw, ws, b, -128, 127, w8a8.GEMM, values)
    )
    torch.library.opcheck(
        ops.triton_linear_w8a8_static.default,
        (x, xs, xz, qw, ws, None, -128, 127, w8a8.AUTO, []),
    )
    with pytest.raises(ValueError, match="needs 7 ints"):
        ops.triton_linear_w8a8_dynamic(x, qw, ws, b, -128, 127, w8a8.GEMM, [16])
    with pytest.raises(ValueError, match="qmin=-200"):
        ops.triton_linear_w8a8_dynamic(x, qw, ws, b, -200, 127, w8a8.AUTO, [])


# --------------------------------------------------------------------------- selection


def test_select_tables_and_fit():
    kernel, cfg = w8a8.select(4096, 4096, 1, H100)
    assert kernel == w8a8.FUSED and cfg["block_m"] == 16 and cfg["split_k"] >= 1
    sel = w8a8.select_explained(4096, 4096, 1024, H100)
    assert sel.kernel == w8a8.GEMM and "h100" in sel.reason and "untuned" in sel.reason
    assert not sel.exact
    kernel, cfg = w8a8.select(40, 96, 3, "cpu")  # default table, blocks fitted to the shape
    assert cfg["block_n"] <= 64 and cfg["block_k"] <= 128 and cfg["block_m"] == 16
    assert w8a8.select(4096, 4096, None, H100) == (w8a8.AUTO, {})
    assert w8a8.config_from_values(kernel, w8a8.config_values(kernel, cfg)) == cfg
    assert bucket_m(17) == 32 and bucket_m(100000) == 8192
    for kernel, cfg in w8a8.candidates(4096, 4096, 32):
        w8a8.FAMILY.check_config(kernel, cfg)
    with pytest.raises(ValueError, match="unknown w8a8 kernel"):
        w8a8.config_values("w8a8.nope", {})
    tables = w8a8.FAMILY.tables()
    assert {t.name for t in tables} == {"default", "h100"} and not any(t.tuned for t in tables)


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None, reason="no CUDA Triton backend"
)
def test_kernels_compile_for_hopper():
    """Triton's full compiler (to a cubin, with the bundled ptxas) for sm_90, also without a
    GPU: catches what the interpreter does not check. Runs in a subprocess without
    TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from slimc.kernels.w8a8.aot import compile_family; print(compile_family('w8a8', 90))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sm_90" in proc.stdout
