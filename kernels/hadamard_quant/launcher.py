"""Launch the fused Hadamard + per-token quantization kernel (CUDA, or CPU under the interpreter).

`hadamard_quantize(x, signs, qmin, qmax, kernel, config)` runs "hadamard_quant.fused" with a
static config, or "hadamard_quant.auto": select from the tables and, on a real GPU, benchmark
a few configs once per shape without a table entry (SLIMC_HADAMARD_QUANT_AUTOTUNE=0: off).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from slimc.kernels.hadamard_quant import dispatch as dsp
from slimc.kernels.w8a8.launcher import FLOAT_DTYPES, round_id
from slimc.kernels.w8a8.tables import autotune_enabled, cdiv, interpreting, pow2_ceil, tune
from slimc.rotate.hadamard import paley1, paley2, sylvester

__all__ = ["factor_matrix", "hadamard_quantize"]

AUTOTUNE_ENV = "SLIMC_HADAMARD_QUANT_AUTOTUNE"


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    from slimc.kernels.hadamard_quant import triton_kernels

    return triton_kernels


@functools.lru_cache(maxsize=64)
def factor_matrix(n: int) -> Tensor:
    """The m x m factor A (float64, +-1) with `hadamard(n) = kron(A, Sylvester(n // m))`."""
    from slimc.rotate.hadamard import construction

    m, _ = dsp.factor_orders(n)
    a = torch.ones(1, 1, dtype=torch.float64)
    builders = {"sylvester": lambda f: sylvester(f.order), "paley1": lambda f: paley1(f.q),
                "paley2": lambda f: paley2(f.q)}  # fmt: skip
    factors = construction(n)
    for f in factors[:-1] if m != n else factors:
        a = torch.kron(a, builders[f.kind](f))
    assert a.shape == (m, m), (n, a.shape)
    return a


@functools.lru_cache(maxsize=64)
def _padded_at(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A^T zero-padded to [MP, cdiv(m, DOT_K) * DOT_K] in `dtype` on `device`."""
    a = factor_matrix(n)
    m = a.shape[0]
    out = torch.zeros(pow2_ceil(m), cdiv(m, dsp.DOT_K) * dsp.DOT_K, dtype=torch.float64)
    out[:m, :m] = a.t()
    return out.to(dtype=dtype, device=device)


def _check(x: Tensor, signs: Tensor, qmin: int, qmax: int) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hadamard_quantize: x must be float16/bfloat16/float32, got {x.dtype}")
    n = x.shape[-1]
    if signs.shape != (n,):
        raise ValueError(f"hadamard_quantize: signs must have shape [{n}], got {list(signs.shape)}")
    if not (-128 <= qmin < 0 < qmax <= 127):
        raise ValueError(f"qmin={qmin}, qmax={qmax}: expected -128 <= qmin < 0 < qmax <= 127")
    if x.device != signs.device:
        raise ValueError(f"x is on {x.device} but signs on {signs.device}")
    interpreted = (
        interpreting() and type(_kernels().hadamard_quant_kernel).__name__ == "InterpretedFunction"
    )
    if x.device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"hadamard_quantize: Triton kernels need CUDA tensors (got {x.device}); set "
            "TRITON_INTERPRET=1 before they are first imported to run them on CPU"
        )


def _launch(x2: Tensor, signs: Tensor, qmin: int, qmax: int, cfg: dict[str, int]):
    m, n = x2.shape
    mf, p2 = dsp.factor_orders(n)
    q = torch.empty((m, n), dtype=torch.int8, device=x2.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    if m == 0:
        return q, scale
    on_gpu = x2.is_cuda and not interpreting()
    # 16-bit x: the dot runs on x's dtype (A is +-1, exact); the interpreter's bf16 dot is
    # broken, so there (and for fp32 x) both operands are fp32
    native = x2.dtype == torch.float16 or (x2.dtype == torch.bfloat16 and on_gpu)
    at = _padded_at(n, x2.dtype if native else torch.float32, x2.device)
    precision = "native" if native else ("tf32x3" if on_gpu else "ieee")
    block = cfg["block_m"]
    _kernels().hadamard_quant_kernel[(cdiv(m, block),)](
        x2, at, signs, q, scale, m, x2.stride(0), q.stride(0), 1.0 / math.sqrt(n),
        float(qmin), float(qmax), MF=mf, MP=pow2_ceil(mf), KC=dsp.DOT_K, P2=p2,
        LOG_P2=p2.bit_length() - 1, USE_DOT=bool(cfg["use_dot"]), DOT_PRECISION=precision,
        ROUND_ID=round_id(x2.dtype), USE_RINT=on_gpu, BLOCK_M=block,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return q, scale


def hadamard_quantize(
    x: Tensor,
    signs: Tensor,
    qmin: int,
    qmax: int,
    kernel: str = dsp.AUTO,
    config: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """`slimc::hadamard_quantize_per_token` in one Triton kernel: (q int8 [..., n], scale f32
    [..., 1]). ValueError for bad operands or configs."""
    _check(x, signs, qmin, qmax)
    n = x.shape[-1]
    x2 = x.detach().reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]

    def run(kern: str, cfg: dict[str, int]):
        return _launch(x2, signs, qmin, qmax, cfg)

    if kernel != dsp.AUTO:
        cfg = dsp.FAMILY.check_config(kernel, dict(config or {}))
    elif m == 0:
        cfg = {"block_m": 1, "use_dot": 0, "num_warps": 4}
    else:
        device = torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu"
        sel = dsp.select_explained(n, m, device)
        cfg = sel.config
        if not sel.exact and x.is_cuda and autotune_enabled(AUTOTUNE_ENV):
            key = ("hadamard_quant", device, n, m if m <= 16 else pow2_ceil(m), x.dtype)
            cfg = tune(key, dsp.candidates(n, m), run, (sel.kernel, sel.config))[1]
    q, scale = run(dsp.FUSED, cfg)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)
