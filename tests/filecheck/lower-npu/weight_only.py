# RUN: slimc-opt %s -p "w8a16,lower-npu" | filecheck %s
# RUN: slimc-opt %s -p "w4a16{group-size=32},lower-npu" | filecheck %s --check-prefix=W4
"""lower-npu, weight-only: npu_weight_quant_batchmatmul on [K, N] weights, [G, N] antiquant params."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# Symmetric int8 per channel: no antiquant offset, group size 0 (per channel).
# CHECK-LABEL: // stage: kernel
# CHECK:       [[W:%[a-z_0-9]+]] = const "model.layers.0.mlp.down_proj.npu_weight" : i8[128, 64]
# CHECK-NEXT:  [[S:%[a-z_0-9]+]] = const "model.layers.0.mlp.down_proj.npu_antiquant_scale" : f32[1, 64]
# CHECK-NEXT:  slimc.npu_linear_w8a16({{%[a-z_0-9]+}}, [[W]], [[S]], none, none, antiquant_group_size=0) : f32[{{.*}}, 64]  {kernel = "npu.weight_quant_batchmatmul", config = {group_size = 0, weight = 'int8'}}  loc("model.layers.0.mlp.down_proj")
# CHECK-NOT:   slimc.linear_w8a16
# CHECK:       aten.linear({{.*}} loc("lm_head")

# Asymmetric int4 groups of 32: int4pack words along N, offset = -zero point, [K / 32, N].
# W4-LABEL: // stage: kernel
# W4:       [[W:%[a-z_0-9]+]] = const "model.layers.0.mlp.up_proj.npu_weight" : i32[64, 16]
# W4-NEXT:  [[S:%[a-z_0-9]+]] = const "model.layers.0.mlp.up_proj.npu_antiquant_scale" : f32[2, 128]
# W4-NEXT:  [[O:%[a-z_0-9]+]] = const "model.layers.0.mlp.up_proj.npu_antiquant_offset" : f32[2, 128]
# W4-NEXT:  slimc.npu_linear_w4a16({{%[a-z_0-9]+}}, [[W]], [[S]], [[O]], none, antiquant_group_size=32) : f32[{{.*}}, 128]  {kernel = "npu.weight_quant_batchmatmul", config = {group_size = 32, weight = 'int4pack'}}  loc("model.layers.0.mlp.up_proj")
# W4-NOT:   slimc.linear_w4a16
