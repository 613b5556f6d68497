# RUN: slimc-opt %s -p "linear-quant{scheme=w4a16 group-size=32},fuse-quantized-linear" | filecheck %s
"""fuse-quantized-linear w4a16: slimc.linear_w4a16 on int4 weights packed two per byte (u8)."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# CHECK-LABEL: // stage: fused
# CHECK-NOT:   aten.linear
# CHECK-NOT:   weight_q"
# CHECK:       [[S:%[a-z_0-9]+]] = const "model.layers.0.mlp.up_proj.weight_scale" : f32[128, 2]
# CHECK-NEXT:  [[Z:%[a-z_0-9]+]] = const "model.layers.0.mlp.up_proj.weight_zero_point" : i8[128, 2]
# CHECK-NEXT:  [[P:%[a-z_0-9]+]] = const "model.layers.0.mlp.up_proj.weight_packed" : u8[128, 32]
# CHECK-NEXT:  slimc.linear_w4a16([[X:%[a-z_0-9]+]], [[P]], [[S]], [[Z]], none, group_size=32) : f32[{{.*}}, 128]  loc("model.layers.0.mlp.up_proj")
# CHECK-NOT:   slimc.dequantize_affine
# CHECK-NOT:   aten.linear
# CHECK:       loc("model.norm")
# CHECK:       aten.linear({{.*}} loc("lm_head")
# CHECK-NOT:   weight_q"
