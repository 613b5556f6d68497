"""W4A16 Triton kernels against the slimc::linear_w4a16 reference, config tables and selection.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/kernels/conftest.py
sets TRITON_INTERPRET=1); with one, the same tests run the compiled kernels on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import slimc.ops  # noqa: E402, F401
from slimc.kernels.w4a16 import dispatch as dsp  # noqa: E402
from slimc.kernels.w4a16 import launch, select, select_explained  # noqa: E402
from slimc.ops import pack_int4  # noqa: E402

ops = torch.ops.slimc
H100 = "NVIDIA H100 80GB HBM3"
# of max|ref|; bf16 is loose because the CPU interpreter truncates fp32 -> bf16 casts
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GEMV_CFG = {"block_n": 16, "block_k": 32, "split_k": 1, "num_warps": 4, "num_stages": 1}
GEMM_CFG = {"block_m": 16, "block_n": 16, "block_k": 32, "split_k": 1, "group_m": 2,
            "num_warps": 4, "num_stages": 1}  # fmt: skip


def _problem(m, n, k, group, asym, bias, dtype, device, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else k // group
    x = torch.randn((*lead, m, k), generator=g).to(dtype)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand((n, groups), generator=g) * 0.05 + 0.01
    zp = torch.randint(-4, 5, (n, groups), generator=g, dtype=torch.int8) if asym else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    args = (x, pack_int4(q), scale, zp, group, b)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _check(out, args):
    x = args[0]
    ref = ops.linear_w4a16(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    assert out.dtype == x.dtype
    assert out.shape == ref.shape
    err = (out.cpu().float() - ref.float()).abs().max().item()
    assert err <= TOL[x.dtype] * ref.float().abs().max().item(), err


# (m, n, k, group, asym, bias, dtype, split_k): odd M, N = 40 not a multiple of 16, every group.
CASES = [
    (1, 40, 128, -1, False, False, torch.float32, 1),
    (3, 40, 128, 32, True, True, torch.bfloat16, 2),
    (1, 40, 256, 64, True, False, torch.float16, 4),
    (17, 40, 256, 128, False, True, torch.float32, 2),
    (3, 24, 128, 128, True, True, torch.float16, 1),
    (17, 40, 128, 64, True, True, torch.bfloat16, 1),
]


@pytest.mark.parametrize(("m", "n", "k", "group", "asym", "bias", "dtype", "split"), CASES)
def test_gemv_matches_reference(device, m, n, k, group, asym, bias, dtype, split):
    args = _problem(m, n, k, group, asym, bias, dtype, device)
    out = launch(*args, dsp.GEMV, {**GEMV_CFG, "split_k": split})
    _check(out, args)


@pytest.mark.parametrize(("m", "n", "k", "group", "asym", "bias", "dtype", "split"), CASES)
def test_gemm_matches_reference(device, m, n, k, group, asym, bias, dtype, split):
    args = _problem(m, n, k, group, asym, bias, dtype, device)
    out = launch(*args, dsp.GEMM, {**GEMM_CFG, "split_k": split})
    _check(out, args)


@pytest.mark.parametrize("kernel", [dsp.GEMV, dsp.GEMM])
def test_groups_smaller_than_block_k_and_k_tail(device, kernel):
    """block_k=64 > group 32 (per-element scales) and K=96 (a partial last K step)."""
    args = _problem(3, 20, 96, 32, True, True, torch.float32, device)
    base = GEMV_CFG if kernel == dsp.GEMV else GEMM_CFG
    _check(launch(*args, kernel, {**base, "block_k": 64, "split_k": 2}), args)


def test_leading_dims_and_strided_x(device):
    x, *rest = _problem(5, 40, 64, 32, True, False, torch.float32, device, lead=(2,))
    wide = torch.cat([x, torch.ones_like(x)], dim=-1)[..., :64]  # row stride 128, not 64
    args = (wide, *rest)
    _check(launch(*args, dsp.GEMM, GEMM_CFG), args)
    _check(launch(*args, dsp.GEMV, GEMV_CFG), args)


def test_dequant_linear_and_auto(device):
    args = _problem(9, 40, 128, 64, True, True, torch.bfloat16, device)
    cfg = {"block_n": 16, "block_k": 32, "num_warps": 4}
    _check(launch(*args, dsp.DEQUANT_LINEAR, cfg), args)
    _check(launch(*args, dsp.AUTO, {}), args)


def test_bad_operands_are_rejected(device):
    x, qw, scale, zp, group, bias = _problem(1, 16, 64, 32, True, False, torch.float32, device)
    with pytest.raises(ValueError, match="does not divide"):
        launch(x, qw, scale, zp, 48, bias, dsp.GEMV, GEMV_CFG)
    with pytest.raises(ValueError, match="K=32"):
        launch(x[:, :32], qw, scale, zp, group, bias, dsp.GEMV, GEMV_CFG)
    with pytest.raises(ValueError, match="split_k"):
        launch(x, qw, scale, zp, group, bias, dsp.GEMV, {**GEMV_CFG, "split_k": 3})
    with pytest.raises(ValueError, match="unknown W4A16 kernel"):
        launch(x, qw, scale, zp, group, bias, "w4a16.nope", {})


# --------------------------------------------------------------------------- kernel op


def test_kernel_op_runs_reference_off_cuda_and_passes_opcheck():
    args = _problem(3, 24, 64, 32, True, True, torch.float32, "cpu")
    kernel, cfg = select(24, 64, 3, 32, H100)
    values = dsp.config_values(kernel, cfg)
    out = ops.triton_linear_w4a16(*args, kernel, values)
    torch.testing.assert_close(out, ops.linear_w4a16(*args), rtol=0, atol=0)
    torch.library.opcheck(ops.triton_linear_w4a16.default, (*args, kernel, values))
    with pytest.raises(ValueError, match="needs 5 ints"):
        ops.triton_linear_w4a16(*args, dsp.GEMV, [1, 2])


def test_import_without_triton_is_harmless():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import slimc.kernels.w4a16 as w, torch\n"
        "assert not w.ops.HAS_TRITON\n"
        "assert w.select(64, 64, 1, -1, 'cpu')[0] == 'w4a16.gemv'\n"
        "print(torch._C._dispatch_has_kernel_for_dispatch_key('slimc::linear_w4a16', 'CUDA'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False"


def test_cuda_kernel_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("slimc::linear_w4a16", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("slimc::triton_linear_w4a16", "CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_quantized_linear_op_on_cuda_runs_triton(monkeypatch):
    from slimc.kernels.w4a16 import launcher

    calls = []
    real_run = launcher.run
    monkeypatch.setattr(launcher, "run", lambda *a: calls.append(a[1]) or real_run(*a))
    args = _problem(4, 256, 512, 128, True, True, torch.bfloat16, "cuda")
    _check(ops.linear_w4a16(*args), args)
    assert calls == [dsp.AUTO]
    kernel, cfg = select(256, 512, 4, 128, torch.cuda.get_device_name())
    _check(ops.triton_linear_w4a16(*args, kernel, dsp.config_values(kernel, cfg)), args)


# --------------------------------------------------------------------------- tables, selection


def test_m_buckets():
    assert [dsp.bucket_m(m) for m in (1, 2, 3, 16, 17, 1000, 8192, 100000)] == [
        1, 2, 4, 16, 32, 1024, 8192, 8192,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="M must be >= 1, got 0"):
        dsp.bucket_m(0)


def test_tables_load_and_match_devices():
    assert dsp.load_table(H100).name == "h100"
    assert dsp.load_table("NVIDIA A10G").name == "default"
    assert dsp.load_table(None).name == "default"
    for name in ("h100", "default"):
        table = dsp.load_table(H100 if name == "h100" else "cpu")
        assert not table.tuned and "untuned" in table.status
        assert set(table.rules) >= {1, 1024}


def test_select_by_m_on_h100():
    assert select(4096, 4096, 1, 128, H100) == (
        dsp.GEMV, {"block_n": 128, "block_k": 64, "split_k": 8, "num_warps": 4, "num_stages": 2},
    )  # fmt: skip
    kernel, cfg = select(4096, 4096, 16, 128, H100)
    assert kernel == dsp.GEMM and cfg["block_m"] == 16 and cfg["split_k"] == 16
    sel = select_explained(4096, 4096, 16, 128, H100)
    assert sel.exact and "N=4096,K=4096" in sel.reason and "untuned" in sel.reason
    assert select(4096, 14336, 8192, 128, H100)[0] == dsp.DEQUANT_LINEAR
    assert select(4096, 4096, 256, 128, H100)[0] == dsp.GEMM
    assert select(4096, 4096, None, 128, H100) == (dsp.AUTO, {})
    unknown = select_explained(5120, 2048, 1, -1, H100)
    assert unknown.kernel == dsp.GEMV and not unknown.exact and "rules" in unknown.reason


def test_fit_config_respects_group_and_shape():
    _, cfg = select(4096, 4096, 16, 32, H100)
    assert cfg["block_k"] == 32  # one scale per K step
    _, cfg = select(40, 96, 3, 32, "cpu")
    assert cfg["block_n"] == 64 and cfg["block_m"] == 16 and cfg["block_k"] == 32
    # split_k = 0 in a rule: enough splits to fill the SMs, capped by the K steps
    cfg = dsp.fit_config(dsp.GEMV, {**GEMV_CFG, "block_n": 128, "block_k": 64, "split_k": 0},
                         n=4096, k=4096, m=1, group_size=-1, sms=132)  # fmt: skip
    assert cfg["split_k"] == 8
    cfg = dsp.fit_config(dsp.GEMV, {**GEMV_CFG, "split_k": 0}, n=16, k=64, m=1,
                         group_size=-1, sms=132)  # fmt: skip
    assert cfg["split_k"] == 2  # only 2 K steps of 32


def test_config_values_round_trip_and_errors():
    _, cfg = select(4096, 14336, 32, 128, H100)
    values = dsp.config_values(dsp.GEMM, cfg)
    assert len(values) == len(dsp.CONFIG_KEYS[dsp.GEMM])
    assert dsp.config_from_values(dsp.GEMM, values) == cfg
    with pytest.raises(ValueError, match="missing keys"):
        dsp.config_values(dsp.GEMM, {"block_m": 16})
    with pytest.raises(ValueError, match="block_m=8 must be >= 16"):
        dsp.check_config(dsp.GEMM, {**GEMM_CFG, "block_m": 8})
    with pytest.raises(ValueError, match="does not divide"):
        select(64, 96, 1, 64, H100)


@pytest.mark.parametrize("m", [1, 3, 17, 100, 300, 5000])
def test_autotune_candidates_are_valid(m):
    from slimc.kernels.w4a16.launcher import candidates

    found = candidates(4096, 4096, m, 32)
    assert 2 <= len(found) <= 12
    for kernel, cfg in found:
        assert kernel in dsp.KERNELS
        assert dsp.check_config(kernel, cfg) == cfg
        assert kernel == dsp.DEQUANT_LINEAR or 32 % cfg["block_k"] == 0


def test_parse_table_rejects_bad_entries(tmp_path):
    good = json.loads((dsp.CONFIG_DIR / "default.json").read_text())
    assert dsp.parse_table("x", good).rules[1]["kernel"] == dsp.GEMV
    with pytest.raises(ValueError, match="M bucket '3'"):
        dsp.parse_table("x", {"rules": {"3": good["rules"]["1"]}})
    with pytest.raises(ValueError, match="'N,K'"):
        dsp.parse_table("x", {"shapes": {"4096x4096": {}}})
    with pytest.raises(ValueError, match="unknown keys"):
        dsp.parse_table("x", {"rules": {"1": {"kernel": dsp.GEMV, "config": {"bm": 1}}}})
