"""FP8 (e4m3 rowwise) reference ops and Triton kernels: quantization bit-exact, GEMMs against
slimc::linear_fp8_rowwise, kernel op, selection.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/kernels/conftest.py
sets TRITON_INTERPRET=1); with one (compute capability >= 8.9 for the fp8 GEMMs), the same
tests run the compiled kernels. References are computed on CPU copies.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import slimc.ops  # noqa: E402, F401
from slimc.kernels import fp8  # noqa: E402
from slimc.kernels.fp8 import ops as fp8_ops  # noqa: E402
from slimc.kernels.fp8.dispatch import KERNELS_FP8  # noqa: E402
from slimc.kernels.w8a8 import launcher  # noqa: E402
from slimc.ops.fp8 import E4M3_MAX, quantize_weight_fp8_rowwise  # noqa: E402

ops = torch.ops.slimc
H100 = "NVIDIA H100 80GB HBM3"
CFG = {"block_m": 16, "block_n": 16, "block_k": 32, "split_k": 1, "group_m": 2,
       "num_warps": 4, "num_stages": 1}  # fmt: skip
OPCHECK_FP8 = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
"""opcheck's test_schema multiplies the inputs, which float8 tensors do not support on CPU."""
ULP = {torch.float32: 2**-20, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.fixture
def fp8_device(device):
    if device.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability >= 8.9")
    return device


def _cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def _x(shape, dtype, device, seed=0):
    """Activations spanning 4 decades (e4m3 subnormals after scaling), plus a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])
    if x.reshape(-1, shape[-1]).shape[0] >= 3:
        x.reshape(-1, shape[-1])[1] = 0.0
    return x.to(dtype).to(device)


def _weights(n, k, device, bias_dtype=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    qw, ws = quantize_weight_fp8_rowwise(torch.randn((n, k), generator=g))
    b = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return qw.to(device), ws.to(device), None if b is None else b.to(device)


def _assert_close(out, ref):
    """fp32 accumulation against the exact reference: a few fp32 ulps of the largest output
    (on a GPU 2^-10: Hopper fp8 MMAs may accumulate with fewer bits); 16-bit outputs within
    one ulp."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = ULP[ref.dtype]
    if out.is_cuda and ref.dtype == torch.float32:
        tol = 2**-10
    out, ref = out.cpu().float(), ref.float()
    scale = ref.abs().max().item() + 1e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * scale)


# --------------------------------------------------------------------------- reference ops


def test_weight_quantization_rowwise():
    w = torch.randn(24, 64) * torch.rand(24, 1) * 3
    qw, ws = quantize_weight_fp8_rowwise(w)
    assert qw.dtype == torch.float8_e4m3fn and ws.shape == (24, 1) and ws.dtype == torch.float32
    assert torch.equal(qw.float().abs().amax(dim=1), torch.full((24,), E4M3_MAX))
    rel = ((qw.float() * ws - w).abs() / w.abs().amax(dim=1, keepdim=True)).max()
    assert rel <= 2**-4  # 3 mantissa bits: half a step relative to the row maximum
    with pytest.raises(ValueError, match="2-D float"):
        quantize_weight_fp8_rowwise(torch.ones(3, 4, 5))


def test_reference_linear_fp8_rowwise():
    x = _x((2, 5, 64), torch.float32, "cpu")
    w = torch.randn(40, 64)
    qw, ws = quantize_weight_fp8_rowwise(w)
    b = torch.randn(40)
    out = ops.linear_fp8_rowwise(x, qw, ws, b)
    xq, x_scale = ops.quantize_per_token_fp8(x)
    explicit = (xq.double() @ qw.double().t()).float() * x_scale * ws.reshape(-1) + b
    assert torch.equal(out, explicit)
    close = F.linear(x, w, b)
    assert ((out - close).norm() / close.norm()).item() < 0.05
    assert ops.linear_fp8_rowwise(x, qw, ws, None, torch.bfloat16).dtype == torch.bfloat16
    torch.library.opcheck(ops.linear_fp8_rowwise.default, (x, qw, ws, b), test_utils=OPCHECK_FP8)
    torch.library.opcheck(ops.quantize_per_token_fp8.default, (x,))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        ops.linear_fp8_rowwise(x, qw.float(), ws, b)


# --------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("shape", [(1, 64), (3, 96), (17, 64), (2, 3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_token_fp8_exact(device, shape, dtype):
    x = _x(shape, dtype, device)
    q, scale = launcher.quantize_per_token(x, -E4M3_MAX, E4M3_MAX, fp8=True)
    q_ref, s_ref = ops.quantize_per_token_fp8(x.cpu())
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.cpu().float(), q_ref.float())
    assert torch.equal(scale.cpu(), s_ref)


def test_e4m3_rounding_ties_and_subnormals(device):
    """absmax = 448 gives scale 1, so the kernel's e4m3 rounding is seen directly: midpoints
    between grid points round to even, subnormals (steps of 2^-9) and the top binade too."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    mids = (grid[:-1] + grid[1:]) / 2
    vals = torch.cat([grid, mids, -mids, mids * (1 + 2**-20), 2.0 ** torch.arange(-12, -5.0)])
    x = torch.cat([vals, torch.tensor([E4M3_MAX])]).reshape(1, -1)
    q, scale = launcher.quantize_per_token(x.to(device), -E4M3_MAX, E4M3_MAX, fp8=True)
    q_ref, s_ref = ops.quantize_per_token_fp8(x)
    assert s_ref.item() == 1.0 and scale.cpu().item() == 1.0
    assert torch.equal(q.cpu().float(), q_ref.float())


# --------------------------------------------------------------------------- GEMMs

CASES = [
    (1, 40, 64, torch.float32, True),
    (3, 40, 96, torch.bfloat16, True),
    (17, 24, 64, torch.float16, False),
    (17, 40, 96, torch.float32, False),
]


@pytest.mark.parametrize(("m", "n", "k", "dtype", "bias"), CASES)
@pytest.mark.parametrize("kernel", [fp8.GEMM, fp8.FUSED])
@pytest.mark.parametrize("split", [1, 2])
def test_linear_fp8_matches_reference(fp8_device, m, n, k, dtype, bias, kernel, split):
    x = _x((m, k), dtype, fp8_device)
    qw, ws, b = _weights(n, k, fp8_device, dtype if bias else None)
    cfg = {**CFG, "split_k": split}
    out = launcher.linear_dynamic(x, qw, ws, b, -E4M3_MAX, E4M3_MAX, kernel, cfg, None, KERNELS_FP8)
    _assert_close(out, ops.linear_fp8_rowwise(x.cpu(), qw.cpu(), ws.cpu(), _cpu(b)))


def test_cuda_paths_auto(fp8_device):
    """The functions registered as CUDA kernels, run through the tables (3-D x, fp32 out)."""
    x = _x((2, 3, 64), torch.bfloat16, fp8_device)
    qw, ws, b = _weights(40, 64, fp8_device, torch.float32)
    if fp8_device.type == "cpu":  # the interpreter: call the launcher the CUDA kernel calls
        out = launcher.linear_dynamic(x, qw, ws, b, -E4M3_MAX, E4M3_MAX, fp8.AUTO, {},
                                      torch.float32, KERNELS_FP8)  # fmt: skip
    else:
        out = fp8_ops._linear_fp8_rowwise_cuda(x, qw, ws, b, torch.float32)
    ref = ops.linear_fp8_rowwise(x.cpu(), qw.cpu(), ws.cpu(), b.cpu(), torch.float32)
    _assert_close(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._scaled_mm needs CUDA")
def test_matches_scaled_mm_on_gpu(fp8_device):
    x = _x((64, 256), torch.bfloat16, fp8_device)
    qw, ws, _ = _weights(128, 256, fp8_device)
    xq, xs = ops.quantize_per_token_fp8(x)
    ref = torch._scaled_mm(
        xq, qw.t(), scale_a=xs, scale_b=ws.t().contiguous(), out_dtype=torch.bfloat16
    )
    out = ops.linear_fp8_rowwise(x, qw, ws, None)
    torch.testing.assert_close(out, ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


# --------------------------------------------------------------------------- op and selection


def test_kernel_op_and_selection():
    x = _x((3, 64), torch.float32, "cpu")
    qw, ws, b = _weights(24, 64, "cpu", torch.float32)
    values = fp8.config_values(fp8.GEMM, CFG)
    out = ops.triton_linear_fp8_rowwise(x, qw, ws, b, fp8.GEMM, values)
    assert torch.equal(out, ops.linear_fp8_rowwise(x, qw, ws, b))
    torch.library.opcheck(
        ops.triton_linear_fp8_rowwise.default, (x, qw, ws, b, fp8.AUTO, []), test_utils=OPCHECK_FP8
    )
    assert not fp8_ops.fp8_supported(x)  # CPU tensors: the reference path
    kernel, cfg = fp8.select(4096, 4096, 16, H100)
    assert kernel == fp8.FUSED and cfg["block_k"] == 128
    sel = fp8.select_explained(4096, 14336, 4096, H100)
    assert sel.kernel == fp8.GEMM and "untuned" in sel.reason and cfg["split_k"] >= 1
    assert fp8.select(4096, 4096, None, "cpu") == (fp8.AUTO, {})
    assert fp8.config_from_values(kernel, fp8.config_values(kernel, cfg)) == cfg
    with pytest.raises(ValueError, match="unknown fp8 kernel"):
        fp8.config_values("w8a8.gemm", cfg)


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None, reason="no CUDA Triton backend"
)
def test_kernels_compile_for_hopper():
    """Triton's full compiler (to a cubin, with the bundled ptxas) for sm_90, also without a
    GPU: catches what the interpreter does not check. Runs in a subprocess without
    TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from slimc.kernels.w8a8.aot import compile_family; print(compile_family('fp8', 90))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sm_90" in proc.stdout
