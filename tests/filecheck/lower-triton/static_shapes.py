# RUN: slimc-opt %s -p "w4a16{group-size=32},lower-triton{device=default}" | filecheck %s
# RUN: slimc-opt %s -p "w8a8-dynamic,lower-triton{device=default}" | filecheck %s --check-prefix=W8A8
# RUN: slimc-opt %s -p "w8a8,lower-triton{device=default}" | filecheck %s --check-prefix=STATIC
"""lower-triton with static shapes: each linear names its Triton kernel and static config."""

import torch

from tests.models import tiny_mlp


def build():
    model = tiny_mlp(seed=0)
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 5, 64, generator=gen),) for _ in range(2)]
    return model, model.example_inputs(), calib


# 16 rows of int4 weights: a tensor-core GEMM tile from the default table.
# CHECK-LABEL: // stage: kernel
# CHECK:       slimc.triton_linear_w4a16(%x, %fc1_weight_packed, %fc1_weight_scale, %fc1_weight_zero_point, %fc1_bias, group_size=32, kernel="w4a16.{{[a-z_]+}}", config=[{{[0-9, ]+}}]) : f32[2, 8, 128]  {kernel = "triton.w4a16.{{[a-z_]+}}", config = {{{.*}}}}  loc("fc1")
# CHECK-NOT:   slimc.linear_w4a16

# Dynamic int8: the per-token quantization is inside the kernel op.
# W8A8-LABEL: // stage: kernel
# W8A8-NOT:   slimc.quantize_per_token
# W8A8:       slimc.triton_linear_w8a8_dynamic(%x, %fc1_weight_q, %fc1_weight_scale, %fc1_bias, qmin=-128, qmax=127, kernel="w8a8.{{[a-z_]+}}", config=[{{[0-9, ]+}}], out_dtype=f32) : f32[2, 8, 128]  {kernel = "triton.w8a8.{{[a-z_]+}}", config = {{{.*}}}}  loc("fc1")
# W8A8-NOT:   slimc.linear_w8a8

# Static int8: the static quantize_affine is folded into the kernel op.
# STATIC-LABEL: // stage: kernel
# STATIC-NOT:   slimc.quantize_affine
# STATIC:       slimc.triton_linear_w8a8_static(%x, {{.*}}, qmin=-128, qmax=127, kernel="w8a8.{{[a-z_]+}}", config=[{{[0-9, ]+}}], out_dtype=f32) : f32[2, 8, 128]  {kernel = "triton.w8a8.{{[a-z_]+}}"
# STATIC-NOT:   slimc.quantize_affine
