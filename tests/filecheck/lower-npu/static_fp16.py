# RUN: slimc-opt %s -p "w8a8,lower-npu" | filecheck %s
"""lower-npu, static W8A8 with float16 outputs: deq_scale is npu_trans_quant_param's int64."""

import torch

from tests.models import tiny_mlp


def build():
    model = tiny_mlp(seed=0).half()
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 5, 64, generator=gen).half(),) for _ in range(2)]
    return model, (model.example_inputs()[0].half(),), calib


# CHECK-LABEL: // stage: kernel
# CHECK:       [[D:%[a-z_0-9]+]] = const "fc2.npu_deq_scale" : i64[64]
# CHECK-NEXT:  [[B:%[a-z_0-9]+]] = const "fc2.npu_quant_bias" : i32[64]
# CHECK-NEXT:  slimc.npu_linear_w8a8({{.*}}, [[D]], [[B]]) : f16[2, 8, 64]  {kernel = "npu.quant_matmul", config = {act = 'int8-static', deq_scale = 'i64'}}  loc("fc2")
