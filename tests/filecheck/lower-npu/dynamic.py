# RUN: slimc-opt %s -p "w8a8-dynamic,lower-npu" | filecheck %s
# RUN: slimc-opt %s -p "w4a8,lower-npu" | filecheck %s --check-prefix=W4A8
# RUN: slimc-opt %s -p "w4a4,lower-npu" | filecheck %s --check-prefix=W4A4
"""lower-npu, dynamic per-token activations: one npu_linear_* call on the float input, weights [K, N]."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# The per-token quantization moves into the kernel op: no quantize_per_token is left.
# CHECK-LABEL: // stage: kernel
# CHECK-NOT:   slimc.quantize_per_token
# CHECK:       [[W:%[a-z_0-9]+]] = const "model.layers.0.mlp.down_proj.npu_weight" : i8[128, 64]
# CHECK-NEXT:  [[S:%[a-z_0-9]+]] = const "model.layers.0.mlp.down_proj.npu_weight_scale" : f32[64]
# CHECK-NEXT:  slimc.npu_linear_w8a8_dynamic({{%[a-z_0-9]+}}, [[W]], [[S]], none) : f32[{{.*}}, 64]  {kernel = "npu.quant_matmul", config = {act = 'int8', quant = 'npu_dynamic_quant', weight = 'int8'}}  loc("model.layers.0.mlp.down_proj")
# CHECK-NOT:   slimc.linear_w8a8
# CHECK-NOT:   slimc.quantize_per_token
# CHECK:       aten.linear({{.*}} loc("lm_head")

# int4 weight values are widened to int8 for the int8 x int8 matmul.
# W4A8-LABEL: // stage: kernel
# W4A8:       [[W:%[a-z_0-9]+]] = const "model.layers.1.self_attn.k_proj.npu_weight" : i8[64, 32]
# W4A8-NEXT:  [[S:%[a-z_0-9]+]] = const "model.layers.1.self_attn.k_proj.npu_weight_scale" : f32[32]
# W4A8-NEXT:  slimc.npu_linear_w4a8_dynamic({{%[a-z_0-9]+}}, [[W]], [[S]], none) {{.*}} {kernel = "npu.quant_matmul", config = {act = 'int8', quant = 'npu_dynamic_quant', weight = 'int4-in-int8'}}  loc("model.layers.1.self_attn.k_proj")
# W4A8-NOT:   slimc.linear_w4a8

# int4 activations and int4pack weights (int32 [K, N / 8]).
# W4A4-LABEL: // stage: kernel
# W4A4:       [[W:%[a-z_0-9]+]] = const "model.layers.0.mlp.gate_proj.npu_weight" : i32[64, 16]
# W4A4-NEXT:  [[S:%[a-z_0-9]+]] = const "model.layers.0.mlp.gate_proj.npu_weight_scale" : f32[128]
# W4A4-NEXT:  slimc.npu_linear_w4a4_dynamic({{%[a-z_0-9]+}}, [[W]], [[S]], none) : f32[{{.*}}, 128]  {kernel = "npu.quant_matmul", config = {act = 'int4', quant = 'npu_dynamic_quant', weight = 'int4pack'}}  loc("model.layers.0.mlp.gate_proj")
# W4A4-NOT:   slimc.linear_w4a8
# W4A4-NOT:   slimc.quantize_per_token
