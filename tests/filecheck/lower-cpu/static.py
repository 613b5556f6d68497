# RUN: slimc-opt %s -p "w8a8,lower-cpu" | filecheck %s
"""lower-cpu, static W8A8: one cpu_linear_int8_static on the float input (quantization inside)."""

import torch

from tests.models import tiny_mlp


def build():
    model = tiny_mlp(seed=0)
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 5, 64, generator=gen),) for _ in range(2)]
    return model, model.example_inputs(), calib


# The static quantize_affine moves into the kernel; the zero point is folded with sum_k w.
# CHECK-LABEL: // stage: kernel
# CHECK-NOT:   slimc.quantize_affine
# CHECK:       [[W:%[a-z_0-9]+]] = const "fc1.weight_q" : i8[128, 64]
# CHECK-NEXT:  [[S:%[a-z_0-9]+]] = const "fc1.cpu_x_scale" : f32[1]
# CHECK-NEXT:  [[Z:%[a-z_0-9]+]] = const "fc1.cpu_x_zero_point" : i32[1]
# CHECK-NEXT:  [[WS:%[a-z_0-9]+]] = const "fc1.cpu_w_sum" : i32[128]
# CHECK-NEXT:  [[SC:%[a-z_0-9]+]] = const "fc1.cpu_w_scale" : f32[128]
# CHECK-NEXT:  slimc.cpu_linear_int8_static(%x, [[W]], [[S]], [[Z]], [[WS]], [[SC]], %fc1_bias, qmin=-128, qmax=127) : f32[2, 8, 128]  {kernel = "cpu.int_mm", config = {act = 'static per-tensor', epilogue = 'compiled'}}  loc("fc1")
# CHECK-NOT:   slimc.linear_w8a8
# CHECK-NOT:   slimc.quantize_affine
