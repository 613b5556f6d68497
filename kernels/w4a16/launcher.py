"""Launch the W4A16 Triton kernels: argument checks, grids, split-K scratch, runtime autotune.

`launch` runs one named kernel with one static config. It needs CUDA tensors, or CPU tensors
with TRITON_INTERPRET=1 set before the kernels module is first imported (tests do that).
`linear_w4a16` is the runtime path: it selects from the tables and, on a real GPU, benchmarks a
few candidate configs once for shapes that have no table entry.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from slimc.kernels.w4a16 import dispatch as dsp

logger = logging.getLogger(__name__)

__all__ = [
    "Problem",
    "autotune_enabled",
    "benchmark",
    "candidates",
    "interpreting",
    "launch",
    "linear_w4a16",
    "prepare",
    "run",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
AUTOTUNE_ENV = "SLIMC_W4A16_AUTOTUNE"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def autotune_enabled() -> bool:
    """Runtime autotune of unknown shapes: on a real GPU unless SLIMC_W4A16_AUTOTUNE=0."""
    return not interpreting() and os.environ.get(AUTOTUNE_ENV, "1") != "0"


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    from slimc.kernels.w4a16 import triton_kernels

    return triton_kernels


def _interpreted_kernels() -> bool:
    return interpreting() and type(_kernels().w4a16_gemv_kernel).__name__ == "InterpretedFunction"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Problem:
    """Validated operands of one call, flattened to 2-D."""

    x: Tensor  # [M, K]
    lead: tuple[int, ...]
    qweight: Tensor  # uint8 [N, K // 2]
    scale: Tensor  # float32 [N, G]
    zero_point: Tensor | None  # int8 [N, G]
    bias: Tensor | None  # [N] in x's dtype
    group: int  # K for per-channel
    n: int
    k: int

    @property
    def m(self) -> int:
        return self.x.shape[0]


def prepare(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    group_size: int,
    bias: Tensor | None,
) -> Problem:
    """Check the operands of one call and flatten x to [M, K]; ValueError names the bad one."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"W4A16 Triton kernels take float16/bfloat16/float32 x, got {x.dtype}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(
            f"qweight must be a 2-D uint8 tensor, got {qweight.dtype} {list(qweight.shape)}"
        )
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but qweight packs K={k}")
    group = k if group_size == -1 else group_size
    if group < 1 or k % group:
        raise ValueError(f"group_size={group_size} does not divide K={k}")
    groups = k // group
    if scale.numel() != n * groups:
        raise ValueError(f"scale has shape {list(scale.shape)}; expected [{n}, {groups}]")
    if zero_point is not None and zero_point.numel() != n * groups:
        raise ValueError(f"zero_point has shape {list(zero_point.shape)}; expected [{n}, {groups}]")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias has shape {list(bias.shape)}; expected [{n}]")
    tensors = [t for t in (x, qweight, scale, zero_point, bias) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(
            f"W4A16 operands are on different devices: {[str(t.device) for t in tensors]}"
        )
    if x.device.type != "cuda" and not _interpreted_kernels():
        raise RuntimeError(
            f"W4A16 Triton kernels need CUDA tensors (got {x.device}); "
            "set TRITON_INTERPRET=1 before they are first imported to run them on CPU"
        )
    return Problem(
        x=x.reshape(-1, k),
        lead=tuple(x.shape[:-1]),
        qweight=qweight,
        scale=scale.reshape(n, groups).to(torch.float32),
        zero_point=None if zero_point is None else zero_point.reshape(n, groups).to(torch.int8),
        bias=None if bias is None else bias.reshape(n).to(x.dtype).contiguous(),
        group=group,
        n=n,
        k=k,
    )


def _common_args(p: Problem) -> tuple[list[Any], dict[str, Any]]:
    zp = p.zero_point if p.zero_point is not None else p.scale  # never read when HAS_ZP=False
    args: list[Any] = [p.qweight, p.scale, zp]
    strides = [*p.qweight.stride(), *p.scale.stride(), *zp.stride()]
    return args + strides, {"HAS_ZP": p.zero_point is not None}


def _scale_2d(p: Problem, block_k: int) -> bool:
    """Scales vary inside a K step unless block_k divides the group (per channel: never)."""
    return p.group != p.k and p.group % block_k != 0


def _run_gemv(p: Problem, cfg: dict[str, int]) -> Tensor:
    if p.m > 65535:  # one grid row per activation row
        raise ValueError(f"w4a16.gemv handles at most 65535 rows, got M={p.m}; use w4a16.gemm")
    split = cfg["split_k"]
    out_dtype = p.x.dtype if split == 1 else torch.float32
    alloc = torch.empty if split == 1 else torch.zeros
    out = alloc((p.m, p.n), dtype=out_dtype, device=p.x.device)
    grid = (_cdiv(p.n, cfg["block_n"]), split, p.m)
    w_args, flags = _common_args(p)
    q, s, z, *w_strides = w_args
    _kernels().w4a16_gemv_kernel[grid](
        p.x, q, s, z, p.bias if p.bias is not None else s, out,
        p.m, p.n, p.k, p.group, *p.x.stride(), *w_strides, *out.stride(),
        HAS_BIAS=p.bias is not None, SCALE_2D=_scale_2d(p, cfg["block_k"]),
        BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], SPLIT_K=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags,
    )  # fmt: skip
    return out.to(p.x.dtype)


def _upcast_dot(p: Problem) -> bool:
    """Triton's CPU interpreter multiplies bfloat16 dot operands as raw uint16 bits (triton 3.9):
    feed it exact fp32 copies there; compiled kernels always use the 16-bit tensor-core dot."""
    return p.x.dtype == torch.bfloat16 and not p.x.is_cuda


def _run_gemm(p: Problem, cfg: dict[str, int]) -> Tensor:
    split = cfg["split_k"]
    out_dtype = p.x.dtype if split == 1 else torch.float32
    alloc = torch.empty if split == 1 else torch.zeros
    out = alloc((p.m, p.n), dtype=out_dtype, device=p.x.device)
    tiles = _cdiv(p.m, cfg["block_m"]) * _cdiv(p.n, cfg["block_n"])
    w_args, flags = _common_args(p)
    q, s, z, *w_strides = w_args
    _kernels().w4a16_gemm_kernel[(tiles, split)](
        p.x, q, s, z, p.bias if p.bias is not None else s, out,
        p.m, p.n, p.k, p.group, *p.x.stride(), *w_strides, *out.stride(),
        HAS_BIAS=p.bias is not None, SCALE_2D=_scale_2d(p, cfg["block_k"]),
        DOT_PRECISION="ieee" if p.x.dtype == torch.float32 else "tf32",
        UPCAST_DOT=_upcast_dot(p),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        SPLIT_K=split, GROUP_M=cfg["group_m"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags,
    )  # fmt: skip
    return out.to(p.x.dtype)


def dequantize(p: Problem, cfg: dict[str, int]) -> Tensor:
    """The dense weight [N, K] in x's dtype, written by the Triton dequant kernel."""
    w = torch.empty((p.n, p.k), dtype=p.x.dtype, device=p.x.device)
    grid = (_cdiv(p.n, cfg["block_n"]), _cdiv(p.k, cfg["block_k"]))
    w_args, flags = _common_args(p)
    _kernels().w4a16_dequant_kernel[grid](
        *w_args[:3], w, p.n, p.k, p.group, *w_args[3:], *w.stride(),
        BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"], **flags,
    )  # fmt: skip
    return w


def _run_dequant_linear(p: Problem, cfg: dict[str, int]) -> Tensor:
    return F.linear(p.x, dequantize(p, cfg), p.bias)


_RUNNERS = {dsp.GEMV: _run_gemv, dsp.GEMM: _run_gemm, dsp.DEQUANT_LINEAR: _run_dequant_linear}


def run(p: Problem, kernel: str, config: dict[str, Any]) -> Tensor:
    """Run `kernel` with `config` on a prepared problem; the output has x's leading dims."""
    if p.m == 0:
        return p.x.new_empty((*p.lead, p.n))
    if kernel == dsp.AUTO:
        kernel, config = _choose(p)
    cfg = dsp.check_config(kernel, config)
    return _RUNNERS[kernel](p, cfg).reshape(*p.lead, p.n)


def launch(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    group_size: int,
    bias: Tensor | None,
    kernel: str,
    config: dict[str, Any],
) -> Tensor:
    """Run W4A16 kernel `kernel` ("w4a16.gemv" | "w4a16.gemm" | "w4a16.dequant_linear" |
    "w4a16.auto") with a static `config`; same semantics and output dtype as
    `slimc::linear_w4a16`. ValueError for bad operands or configs.
    """
    p = prepare(x, qweight, scale, zero_point, group_size, bias)
    return run(p, kernel, dict(config))


def linear_w4a16(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    """`slimc::linear_w4a16` through the tables (and autotune for unknown shapes on a GPU)."""
    return launch(x, qweight, scale, zero_point, group_size, bias, dsp.AUTO, {})


# --------------------------------------------------------------------------- runtime choice

_TUNED: dict[tuple[Any, ...], tuple[str, dict[str, int]]] = {}


def _device_name(x: Tensor) -> str:
    return torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu"


def _choose(p: Problem) -> tuple[str, dict[str, int]]:
    device = _device_name(p.x)
    group = -1 if p.group == p.k else p.group
    sel = dsp.select_explained(p.n, p.k, p.m, group, device)
    if sel.exact or not (p.x.is_cuda and autotune_enabled()):
        return sel.kernel, sel.config
    if torch.cuda.is_current_stream_capturing():  # no benchmarking inside a CUDA graph capture
        return sel.kernel, sel.config
    key = (device, p.n, p.k, dsp.bucket_m(p.m), group, p.x.dtype, p.zero_point is not None)
    if key not in _TUNED:
        _TUNED[key] = _autotune(p, group, sel)
    return _TUNED[key]


def candidates(n: int, k: int, m: int, group_size: int, sms: int = 132) -> list[tuple[str, dict]]:
    """A few configs around the M-bucket rules, for autotuning one shape."""
    fit = functools.partial(dsp.fit_config, n=n, k=k, m=m, group_size=group_size, sms=sms)
    out: list[tuple[str, dict[str, int]]] = []
    if m <= 4:
        for bn, bk in ((64, 64), (128, 64), (256, 32), (128, 128)):
            cfg = {"block_n": bn, "block_k": bk, "split_k": 0, "num_warps": 4, "num_stages": 2}
            out.append((dsp.GEMV, fit(dsp.GEMV, cfg)))
    if 2 <= m <= 128:
        for bn, bk, split in ((64, 64, 0), (32, 128, 0), (128, 64, 0), (64, 64, 1)):
            cfg = {"block_m": 16 if m <= 16 else 64, "block_n": bn, "block_k": bk,
                   "split_k": split, "group_m": 8, "num_warps": 4, "num_stages": 2}  # fmt: skip
            out.append((dsp.GEMM, fit(dsp.GEMM, cfg)))
    if m > 64:
        for bm, bn, bk, warps in ((64, 128, 64, 4), (128, 128, 64, 8), (128, 64, 128, 4)):
            cfg = {"block_m": bm, "block_n": bn, "block_k": bk, "split_k": 1,
                   "group_m": 8, "num_warps": warps, "num_stages": 3}  # fmt: skip
            out.append((dsp.GEMM, fit(dsp.GEMM, cfg)))
    if m >= 128:
        out.append((dsp.DEQUANT_LINEAR, {"block_n": 64, "block_k": 128, "num_warps": 4}))
    unique: dict[str, tuple[str, dict[str, int]]] = {}
    for kernel, cfg in out:
        unique.setdefault(f"{kernel}{sorted(cfg.items())}", (kernel, cfg))
    return list(unique.values())


def benchmark(
    p: Problem, configs: list[tuple[str, dict[str, int]]]
) -> list[tuple[float, str, dict[str, int]]]:
    """(median ms, kernel, config) per config that runs, fastest first (triton do_bench)."""
    from triton.testing import do_bench

    timed = []
    for kernel, cfg in configs:
        try:
            ms = do_bench(lambda k=kernel, c=cfg: _RUNNERS[k](p, c), warmup=5, rep=20)
        except Exception as exc:  # a config that does not compile or fit is skipped, not fatal
            logger.debug("w4a16: %s %s failed: %s", kernel, cfg, exc)
            continue
        timed.append((ms, kernel, cfg))
    return sorted(timed, key=lambda t: t[0])


def _autotune(p: Problem, group: int, fallback: dsp.Selection) -> tuple[str, dict[str, int]]:
    timed = benchmark(p, candidates(p.n, p.k, p.m, group))
    if not timed:
        return fallback.kernel, fallback.config
    ms, kernel, cfg = timed[0]
    logger.info(
        "w4a16 autotune N=%d K=%d M=%d group=%d: %s %s (%.1f us)",
        p.n, p.k, p.m, group, kernel, cfg, ms * 1e3,
    )  # fmt: skip
    return kernel, cfg
