"""Kernel family w8a8: Triton kernels for int8 activations x int8 per-channel weights.

Importing this package
* defines the kernel ops (first argument the float activation, quantization inside)
  `slimc::triton_linear_w8a8_dynamic(x, qweight, w_scale, bias, int qmin, int qmax, str kernel,
  int[] config, ScalarType? out_dtype=None)` (per-token dynamic activations) and
  `slimc::triton_linear_w8a8_static(x, x_scale, x_zero_point, qweight, w_scale, bias, int qmin,
  int qmax, str kernel, int[] config, ScalarType? out_dtype=None)` (static per-tensor): on CUDA
  they launch the named kernel with that static config, elsewhere they run the reference ops;
* registers the Triton paths as the CUDA kernels of `slimc::quantize_per_token` and
  `slimc::linear_w8a8` (tables + autotune), only when triton is installed. Triton itself is
  imported on the first CUDA call, never by importing this package.

Kernels: "w8a8.gemm" (a per-token / per-tensor quantization kernel writes int8 + scales, then a
tiled int8 tl.dot GEMM with int32 accumulation and the x_scale (x) w_scale epilogue + bias,
optional split-K), "w8a8.gemm_fused_quant" (the GEMM quantizes each activation tile in its
prologue: one launch, for small M), and the pseudo kernel "w8a8.auto" (choose per call, for
graphs whose M is not static). Weights stay `[N, K]` int8 as `slimc::linear_w8a8` has them.

For a lowering pass (`lower-triton`)::

    from slimc.kernels.w8a8 import select, config_values
    kernel, config = select(n, k, m, device_name)        # m=None: dynamic M -> "w8a8.auto"
    # dynamic: emit torch.ops.slimc.triton_linear_w8a8_dynamic(x, qweight, w_scale, bias,
    #          qmin, qmax, kernel, config_values(kernel, config), out_dtype)
    # static:  torch.ops.slimc.triton_linear_w8a8_static(x, x_scale, x_zero_point, qweight,
    #          w_scale, bias, qmin, qmax, kernel, config_values(kernel, config), out_dtype)
    # and node.meta[KERNEL_KEY] = KernelBinding(kernel, config, select_explained(...).reason)

`select(n, k, m, device_name) -> (kernel_name, config dict)` reads `configs/<device>.json` (the
first table whose "match" substrings occur in the lower-cased device name, e.g.
"NVIDIA H100 80GB HBM3" -> h100.json, whose entries are marked untuned; otherwise
default.json), keyed by (N, K, bucketed M), falling back to the table's per-M-bucket rules;
block sizes are then fitted to the shape. On a real GPU, "w8a8.auto" benchmarks a few configs
once per shape without an (N, K) entry (SLIMC_W8A8_AUTOTUNE=0 turns that off).
"""

from __future__ import annotations

from slimc.kernels.w8a8 import ops
from slimc.kernels.w8a8.dispatch import (
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
from slimc.kernels.w8a8.tables import bucket_m

__all__ = [
    "AUTO",
    "FAMILY",
    "FUSED",
    "GEMM",
    "KERNELS",
    "bucket_m",
    "candidates",
    "config_from_values",
    "config_values",
    "fit_config",
    "ops",
    "select",
    "select_explained",
]
