"""Kernel family w4a16: Triton kernels for `slimc::linear_w4a16` (int4 weights, float activations).

Importing this package
* defines the kernel op `slimc::triton_linear_w4a16(x, qweight, scale, zero_point, group_size,
  bias, str kernel, int[] config) -> Tensor`: on CUDA it launches the named kernel with that
  static config, elsewhere it runs the PyTorch reference (so a lowered graph runs anywhere);
* registers the Triton path as the CUDA kernel of `slimc::linear_w4a16` (tables + autotune),
  only when triton is installed. Triton itself is imported on the first CUDA call.

Kernels (`dispatch.KERNELS`): "w4a16.gemv" (decode: one row per program, CUDA-core FMAs,
split-K with fp32 atomics), "w4a16.gemm" (tl.dot tiles, fp32 accumulate, optional split-K),
"w4a16.dequant_linear" (Triton dequant to x's dtype, then cuBLAS `F.linear`), and the pseudo
kernel "w4a16.auto" (choose per call, for graphs whose M is not static).

For a lowering pass (`lower-triton`)::

    from slimc.kernels.w4a16 import select, config_values
    kernel, config = select(n, k, m, group_size, device_name)   # m=None: dynamic M
    # emit torch.ops.slimc.triton_linear_w4a16(x, qweight, scale, zero_point, group_size,
    #      bias, kernel, config_values(kernel, config))
    # and node.meta[KERNEL_KEY] = KernelBinding(kernel, config, reason)

`select(n, k, m, group_size, device_name) -> (kernel_name, config dict)` reads
`configs/<device>.json` (the first table whose "match" substrings occur in the lower-cased
device name, e.g. "NVIDIA H100 80GB HBM3" -> h100.json; otherwise default.json), keyed by
(N, K, bucketed M), falling back to the table's per-M-bucket rules; block sizes are then fitted
to the shape and group size. `select_explained` also returns the reason for the binding.
`launch(...)` runs one kernel directly (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from slimc.kernels.w4a16 import ops
from slimc.kernels.w4a16.dispatch import (
    AUTO,
    DEQUANT_LINEAR,
    GEMM,
    GEMV,
    KERNELS,
    bucket_m,
    config_from_values,
    config_values,
    load_table,
    select,
    select_explained,
)
from slimc.kernels.w4a16.launcher import launch

__all__ = [
    "AUTO",
    "DEQUANT_LINEAR",
    "GEMM",
    "GEMV",
    "KERNELS",
    "bucket_m",
    "config_from_values",
    "config_values",
    "launch",
    "load_table",
    "ops",
    "select",
    "select_explained",
]
