# RUN: slimc-opt %s -p "w8a8,lower-npu" | filecheck %s
"""lower-npu, static W8A8: npu_quantize + npu_quant_matmul with deq_scale and the folded quant_bias."""

import torch

from tests.models import tiny_mlp


def build():
    model = tiny_mlp(seed=0)
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 5, 64, generator=gen),) for _ in range(2)]
    return model, model.example_inputs(), calib


# The layer's float bias and activation zero point are folded into the int32 quant_bias.
# CHECK-LABEL: // stage: kernel
# CHECK-NOT:   slimc.quantize_affine
# CHECK:       [[S:%[a-z_0-9]+]] = const "fc1.npu_input_scale" : f32[1]
# CHECK-NEXT:  [[Z:%[a-z_0-9]+]] = const "fc1.npu_input_offset" : i32[1]
# CHECK-NEXT:  [[W:%[a-z_0-9]+]] = const "fc1.npu_weight" : i8[64, 128]
# CHECK-NEXT:  [[D:%[a-z_0-9]+]] = const "fc1.npu_deq_scale" : f32[128]
# CHECK-NEXT:  [[B:%[a-z_0-9]+]] = const "fc1.npu_quant_bias" : i32[128]
# CHECK-NEXT:  [[Y:%[a-z_0-9]+]] = slimc.npu_linear_w8a8(%x, [[S]], [[Z]], [[W]], [[D]], [[B]]) : f32[2, 8, 128]  {kernel = "npu.quant_matmul", config = {act = 'int8-static', deq_scale = 'f32'}}  loc("fc1")
# CHECK-NEXT:  aten.silu([[Y]])
# CHECK:       slimc.npu_linear_w8a8({{.*}} loc("fc2")
# CHECK-NOT:   slimc.linear_w8a8
# CHECK-NOT:   fc1.bias
