"""Kernel family fp8: Triton kernels for e4m3 per-token activations x e4m3 rowwise weights.

Importing this package
* defines the kernel op `slimc::triton_linear_fp8_rowwise(x, qweight, w_scale, bias,
  str kernel, int[] config, ScalarType? out_dtype=None) -> Tensor` (float x in, per-token e4m3
  quantization inside): on CUDA with fp8 tensor cores (compute capability >= 8.9) it launches
  the named kernel with that static config, elsewhere it runs the reference
  `slimc::linear_fp8_rowwise` (slimc/ops/fp8.py);
* registers the Triton paths as the CUDA kernels of `slimc::linear_fp8_rowwise` and
  `slimc::quantize_per_token_fp8`, only when triton is installed (imported on first use).

Kernels: the 8-bit GEMM kernels of the w8a8 family on e4m3 operands with fp32 accumulation:
"fp8.gemm" (a per-token e4m3 quantization kernel, then the tiled tl.dot GEMM with the
x_scale (x) w_scale epilogue + bias, optional split-K), "fp8.gemm_fused_quant" (activation tiles
quantized in the GEMM prologue: one launch, for small M) and the pseudo kernel "fp8.auto".
Weights are `[N, K]` float8_e4m3fn (K-major, as fp8 tensor cores need), w_scale f32 [N, 1]:
`slimc.ops.fp8.quantize_weight_fp8_rowwise(weight)` makes both.

For a lowering pass (`lower-triton`)::

    from slimc.kernels.fp8 import select, config_values
    kernel, config = select(n, k, m, device_name)        # m=None: dynamic M -> "fp8.auto"
    # emit torch.ops.slimc.triton_linear_fp8_rowwise(x, qweight, w_scale, bias, kernel,
    #      config_values(kernel, config), out_dtype)
    # and node.meta[KERNEL_KEY] = KernelBinding(kernel, config, select_explained(...).reason)

`select(n, k, m, device_name) -> (kernel_name, config dict)` reads `configs/<device>.json`
keyed by (N, K, bucketed M), with the per-M-bucket rules as fallback (`h100.json` is marked
untuned; `default.json` serves every other device); block sizes are fitted to the shape. On a
real GPU "fp8.auto" benchmarks a few configs once per shape without an (N, K) entry
(SLIMC_FP8_AUTOTUNE=0 turns that off).
"""

from __future__ import annotations

from slimc.kernels.fp8 import ops
from slimc.kernels.fp8.dispatch import (
    AUTO,
    FAMILY,
    FUSED,
    GEMM,
    KERNELS,
    candidates,
    config_from_values,
    config_values,
    fit_config,
    select,
    select_explained,
)

__all__ = [
    "AUTO",
    "FAMILY",
    "FUSED",
    "GEMM",
    "KERNELS",
    "candidates",
    "config_from_values",
    "config_values",
    "fit_config",
    "ops",
    "select",
    "select_explained",
]
