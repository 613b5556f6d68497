"""Kernel family hadamard_quant: a fused online Hadamard rotation + per-token int8 quantization.

Importing this package
* defines the kernel op `slimc::triton_hadamard_quantize_per_token(x, signs, int qmin,
  int qmax, str kernel, int[] config) -> (q int8, scale f32)`: on CUDA it launches the kernel
  with that static config, elsewhere it runs the reference;
* registers the Triton kernel as the CUDA kernel of `slimc::hadamard_quantize_per_token`
  (reference: `slimc::hadamard` then `slimc::quantize_per_token`, slimc/ops/rotate.py), only
  when triton is installed (imported on first use).

Kernel "hadamard_quant.fused": for n = m * 2^k (`slimc.rotate.hadamard(n) = kron(A_m,
Sylvester(2^k))`), each program loads BLOCK_M rows, applies the m x m factor (tl.dot on tensor
cores with `use_dot=1`, CUDA-core FMAs otherwise), then an in-register fast Walsh-Hadamard
transform for 2^k, scales by signs / sqrt(n), rounds to x's dtype as the unfused ops do, and
writes int8 codes + per-row scales: one read of x, one write of q. Codes match the reference
except where the fp32 rotation and the float64 reference land on different sides of a rounding
boundary (rare; off by one code). "hadamard_quant.auto" chooses the config per call.

For a lowering pass (`lower-triton`)::

    from slimc.kernels.hadamard_quant import select, config_values
    kernel, config = select(n, m, device_name)          # m=None: dynamic M -> ".auto"
    # emit torch.ops.slimc.triton_hadamard_quantize_per_token(x, signs, qmin, qmax, kernel,
    #      config_values(kernel, config)) in place of hadamard + quantize_per_token
    # and node.meta[KERNEL_KEY] = KernelBinding(kernel, config, select_explained(...).reason)

`select(n, m, device_name) -> (kernel_name, config dict)` reads `configs/<device>.json` keyed
by (N, bucketed M) with per-M-bucket rules as fallback (`h100.json` is marked untuned,
`default.json` serves other devices), then fits the tile to registers. On a real GPU ".auto"
benchmarks a few configs once per shape without an N entry (SLIMC_HADAMARD_QUANT_AUTOTUNE=0
turns that off).
"""

from __future__ import annotations

from slimc.kernels.hadamard_quant import ops
from slimc.kernels.hadamard_quant.dispatch import (
    AUTO,
    FAMILY,
    FUSED,
    KERNELS,
    candidates,
    config_from_values,
    config_values,
    factor_orders,
    fit_config,
    select,
    select_explained,
)

__all__ = [
    "AUTO",
    "FAMILY",
    "FUSED",
    "KERNELS",
    "candidates",
    "config_from_values",
    "config_values",
    "factor_orders",
    "fit_config",
    "ops",
    "select",
    "select_explained",
]
