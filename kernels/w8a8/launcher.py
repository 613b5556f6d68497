"""Launch the 8-bit Triton kernels: argument checks, grids, split-K scratch, runtime choice.

Shared by the w8a8 (int8) and fp8 (e4m3) families. Everything here needs CUDA tensors, or CPU
tensors with TRITON_INTERPRET=1 set before the kernels module is first imported (tests do that).
`linear_dynamic` / `linear_static` / `linear_prequantized` run one named kernel ("<family>.gemm",
"<family>.gemm_fused_quant") with a static config, or "<family>.auto": select from the tables and,
on a real GPU, benchmark a few candidate configs once for shapes without a table entry.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from slimc.kernels.w8a8.dispatch import KERNELS_W8A8, GemmKernels
from slimc.kernels.w8a8.tables import autotune_enabled, cdiv, interpreting, pow2_ceil, tune

logger = logging.getLogger(__name__)

__all__ = [
    "E4M3_MAX",
    "FLOAT_DTYPES",
    "linear_dynamic",
    "linear_prequantized",
    "linear_static",
    "quantize_per_token",
    "quantize_static",
    "scaled_mm",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
E4M3_MAX = 448.0
_AUTOTUNE_ENV = {"w8a8": "SLIMC_W8A8_AUTOTUNE", "fp8": "SLIMC_FP8_AUTOTUNE"}


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    from slimc.kernels.w8a8 import triton_kernels

    return triton_kernels


def _check_runnable(*tensors: Tensor | None, what: str) -> None:
    """Same device for all operands, and CUDA unless the kernels run in the interpreter."""
    present = [t for t in tensors if t is not None]
    if len({t.device for t in present}) != 1:
        raise ValueError(
            f"{what}: operands are on different devices {[str(t.device) for t in present]}"
        )
    interpreted = (
        interpreting() and type(_kernels().scaled_mm_kernel).__name__ == "InterpretedFunction"
    )
    if present[0].device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"{what}: Triton kernels need CUDA tensors (got {present[0].device}); set "
            "TRITON_INTERPRET=1 before they are first imported to run them on CPU"
        )


def _use_rint(t: Tensor) -> bool:
    return t.device.type == "cuda" and not interpreting()


def round_id(dtype: torch.dtype) -> int:
    """The `DTYPE_ID` of `round_to_dtype` for an output dtype (0: no rounding before the cast)."""
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


# --------------------------------------------------------------------------- quantizers


def quantize_per_token(
    x: Tensor, qmin: float, qmax: float, fp8: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-token symmetric quantization of x [..., K] -> (q int8 / e4m3 [..., K], scale f32
    [..., 1]); the semantics of `slimc::quantize_per_token` (fp8: qmin/qmax = -+448)."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_per_token: x must be float16/bfloat16/float32, got {x.dtype}")
    _check_runnable(x, what="quantize_per_token")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m and k:
        block_k = min(pow2_ceil(k), 2048)
        block_m = max(1, min(pow2_ceil(m), 2048 // block_k))
        _kernels().quant_per_token_kernel[(cdiv(m, block_m),)](
            x2, q, scale, m, k, *x2.stride(), *q.stride(), float(qmin), float(qmax),
            FP8=fp8, USE_RINT=_use_rint(x), BLOCK_M=block_m, BLOCK_K=block_k,
            num_warps=4 if block_m * block_k <= 2048 else 8,
        )  # fmt: skip
    elif m:
        scale.fill_(torch.finfo(torch.float32).eps)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def quantize_static(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int
) -> Tensor:
    """clamp(round(x / scale + zero_point), qmin, qmax) -> int8 with one scale / zero point."""
    if scale.numel() != 1 or (zero_point is not None and zero_point.numel() != 1):
        raise ValueError("quantize_static takes a one-element scale and zero point")
    _check_runnable(x, scale, zero_point, what="quantize_static")
    xc = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    numel = xc.numel()
    if numel:
        block = 1024
        _kernels().quant_static_kernel[(cdiv(numel, block),)](
            xc, scale, zero_point if zero_point is not None else scale, q, numel,
            float(qmin), float(qmax), HAS_ZP=zero_point is not None, USE_RINT=_use_rint(x),
            BLOCK=block,
        )  # fmt: skip
    return q


# --------------------------------------------------------------------------- the GEMM


@dataclass(frozen=True)
class _Gemm:
    """Validated GEMM operands: a [M, K] (float or 8-bit), w [N, K] 8-bit, scales, bias."""

    a: Tensor
    lead: tuple[int, ...]
    w: Tensor
    w_scale: Tensor  # f32 [N]
    bias: Tensor | None  # [N]
    out_dtype: torch.dtype

    @property
    def m(self) -> int:
        return self.a.shape[0]

    @property
    def n(self) -> int:
        return self.w.shape[0]

    @property
    def k(self) -> int:
        return self.w.shape[1]


def _prepare(
    a: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype, what: str
) -> _Gemm:
    if w.dim() != 2:
        raise ValueError(f"{what}: qweight must be 2-D [N, K], got shape {list(w.shape)}")
    n, k = w.shape
    if a.shape[-1] != k:
        raise ValueError(f"{what}: x has K={a.shape[-1]} but qweight is [N={n}, K={k}]")
    if w_scale.numel() not in (1, n):
        raise ValueError(f"{what}: w_scale has shape {list(w_scale.shape)}; expected [{n}, 1]")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"{what}: bias has shape {list(bias.shape)}; expected [{n}]")
    _check_runnable(a, w, w_scale, bias, what=what)
    scale = w_scale.reshape(-1).to(torch.float32).expand(n).contiguous()
    return _Gemm(
        a=a.reshape(-1, k),
        lead=tuple(a.shape[:-1]),
        w=w,
        w_scale=scale,
        bias=None if bias is None else bias.reshape(n),
        out_dtype=out_dtype,
    )


def scaled_mm(
    g: _Gemm,
    cfg: dict[str, int],
    *,
    a_mode: int,
    a_scale: Tensor | None = None,
    a_zp: Tensor | None = None,
    qmin: float = -128.0,
    qmax: float = 127.0,
    fp8: bool = False,
) -> Tensor:
    """Run `scaled_mm_kernel` (see its docstring for a_mode) and return out [*lead, N]."""
    m, n, k = g.m, g.n, g.k
    if m == 0:
        return g.a.new_empty((*g.lead, n), dtype=g.out_dtype)
    split = cfg["split_k"]
    if split == 1:
        out = torch.empty((m, n), dtype=g.out_dtype, device=g.a.device)
    else:
        out = torch.zeros((m, n), dtype=torch.float32, device=g.a.device)
    dummy = g.w_scale
    a_scale_t = a_scale if a_scale is not None else dummy
    tiles = cdiv(m, cfg["block_m"]) * cdiv(n, cfg["block_n"])
    _kernels().scaled_mm_kernel[(tiles, split)](
        g.a, a_scale_t, a_zp if a_zp is not None else dummy, g.w, g.w_scale,
        g.bias if g.bias is not None else dummy, out,
        m, n, k, *g.a.stride(), *g.w.stride(), *out.stride(), float(qmin), float(qmax),
        A_MODE=a_mode, A_SCALE_PER_ROW=a_scale is not None and a_scale.numel() != 1,
        HAS_ZP=a_zp is not None, HAS_BIAS=g.bias is not None, FP8=fp8,
        USE_RINT=_use_rint(g.a), OUT_ROUND=round_id(out.dtype), BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"], SPLIT_K=split, GROUP_M=cfg["group_m"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out.to(g.out_dtype).reshape(*g.lead, n)


# --------------------------------------------------------------------------- runtime choice


def _device_name(t: Tensor) -> str:
    return torch.cuda.get_device_name(t.device) if t.is_cuda else "cpu"


def _resolve(
    gk: GemmKernels, g: _Gemm, kernel: str, config: dict[str, Any], run: Any, tag: str
) -> tuple[str, dict[str, int]]:
    """The concrete (kernel, config): `auto` selects from the tables (+ autotune on a GPU)."""
    if kernel != gk.auto:
        return kernel, gk.family.check_config(kernel, config)
    device = _device_name(g.a)
    sel = gk.select_explained(g.n, g.k, g.m, device)
    if sel.exact or not (g.a.is_cuda and autotune_enabled(_AUTOTUNE_ENV[gk.prefix])):
        return sel.kernel, sel.config
    key = (gk.prefix, tag, device, g.n, g.k, g.m if g.m <= 16 else pow2_ceil(g.m), g.a.dtype)
    return tune(key, gk.candidates(g.n, g.k, g.m), run, (sel.kernel, sel.config))


def linear_dynamic(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    qmin: int,
    qmax: int,
    kernel: str,
    config: dict[str, Any],
    out_dtype: torch.dtype | None = None,
    gk: GemmKernels = KERNELS_W8A8,
) -> Tensor:
    """Per-token dynamic activations x per-channel 8-bit weights, float x in: the semantics of
    `quantize_per_token` + `linear_w8a8` (int8) or `linear_fp8_rowwise` (gk = the fp8 family)."""
    fp8 = gk.prefix == "fp8"
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{gk.prefix}: x must be float16/bfloat16/float32, got {x.dtype}")
    want = torch.float8_e4m3fn if fp8 else torch.int8
    if qweight.dtype != want:
        raise ValueError(f"{gk.prefix}: qweight must be {want}, got {qweight.dtype}")
    g = _prepare(x, qweight, w_scale, bias, out_dtype or x.dtype, f"{gk.prefix} linear")

    def run(kern: str, cfg: dict[str, int]) -> Tensor:
        if kern == gk.fused:
            return scaled_mm(g, cfg, a_mode=1, qmin=qmin, qmax=qmax, fp8=fp8)
        xq, x_scale = quantize_per_token(g.a, qmin, qmax, fp8=fp8)
        gq = _Gemm(xq, g.lead, g.w, g.w_scale, g.bias, g.out_dtype)
        return scaled_mm(gq, cfg, a_mode=0, a_scale=x_scale, qmin=qmin, qmax=qmax, fp8=fp8)

    return run(*_resolve(gk, g, kernel, dict(config), run, "dynamic"))


def linear_static(
    x: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor | None,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    qmin: int,
    qmax: int,
    kernel: str,
    config: dict[str, Any],
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Static per-tensor int8 activations (`quantize_affine` with one scale and zero point)
    x per-channel int8 weights, float x in: `quantize_affine` + `linear_w8a8`."""
    gk = KERNELS_W8A8
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"w8a8: x must be float16/bfloat16/float32, got {x.dtype}")
    if qweight.dtype != torch.int8:
        raise ValueError(f"w8a8: qweight must be torch.int8, got {qweight.dtype}")
    if x_scale.numel() != 1 or (x_zero_point is not None and x_zero_point.numel() != 1):
        raise ValueError(
            f"w8a8 static: x_scale / x_zero_point must have one element, got shapes "
            f"{list(x_scale.shape)} / {None if x_zero_point is None else list(x_zero_point.shape)}"
        )
    g = _prepare(x, qweight, w_scale, bias, out_dtype or x.dtype, "w8a8 static linear")

    def run(kern: str, cfg: dict[str, int]) -> Tensor:
        if kern == gk.fused:
            return scaled_mm(g, cfg, a_mode=2, a_scale=x_scale, a_zp=x_zero_point,
                             qmin=qmin, qmax=qmax)  # fmt: skip
        xq = quantize_static(g.a, x_scale, x_zero_point, qmin, qmax)
        gq = _Gemm(xq, g.lead, g.w, g.w_scale, g.bias, g.out_dtype)
        return scaled_mm(gq, cfg, a_mode=0, a_scale=x_scale, a_zp=x_zero_point)

    return run(*_resolve(gk, g, kernel, dict(config), run, "static"))


def linear_prequantized(
    xq: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor | None,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    kernel: str | None = None,
    config: dict[str, Any] | None = None,
    gk: GemmKernels = KERNELS_W8A8,
) -> Tensor:
    """`slimc::linear_w8a8` (or the GEMM of `linear_fp8_rowwise`) on already-quantized xq.

    x_scale: one value or one per token ([..., 1]); x_zero_point: None or one value (int8
    only). A `gemm_fused_quant` choice runs as `gemm` (there is nothing to quantize).
    """
    fp8 = gk.prefix == "fp8"
    want = torch.float8_e4m3fn if fp8 else torch.int8
    if xq.dtype != want or qweight.dtype != want:
        raise ValueError(
            f"{gk.prefix}: xq and qweight must be {want}, got {xq.dtype}, {qweight.dtype}"
        )
    g = _prepare(xq, qweight, w_scale, bias, out_dtype, f"{gk.prefix} linear")
    if x_scale.numel() not in (1, g.m):
        raise ValueError(f"{gk.prefix}: x_scale has shape {list(x_scale.shape)}; expected one "
                         f"value or one per token ({g.m})")  # fmt: skip
    if x_zero_point is not None and (fp8 or x_zero_point.numel() != 1):
        raise ValueError(f"{gk.prefix}: x_zero_point must be None or one value")
    a_scale = x_scale.reshape(-1).to(torch.float32).contiguous()

    def run(kern: str, cfg: dict[str, int]) -> Tensor:
        return scaled_mm(g, cfg, a_mode=0, a_scale=a_scale, a_zp=x_zero_point, fp8=fp8)

    kern, cfg = _resolve(gk, g, kernel or gk.auto, dict(config or {}), run, "prequantized")
    return run(gk.gemm if kern == gk.fused else kern, cfg)
