# RUN: slimc-opt %s -p "w4a8" | filecheck %s
"""fuse-quantized-linear w4a8: per-token int8 inputs x packed int4 weights in slimc.linear_w4a8."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# CHECK-LABEL: // stage: fused
# CHECK-NOT:   aten.linear
# CHECK:       [[S:%[a-z_0-9]+]] = const "model.layers.1.self_attn.k_proj.weight_scale" : f32[32, 1]
# CHECK-NEXT:  [[P:%[a-z_0-9]+]] = const "model.layers.1.self_attn.k_proj.weight_packed" : u8[32, 32]
# CHECK-NEXT:  [[QT:%[a-z_0-9]+]] = slimc.quantize_per_token({{%[a-z_0-9]+}})
# CHECK-NEXT:  [[XQ:%[a-z_0-9]+]] = py.getitem([[QT]], 0) : i8[
# CHECK-NEXT:  [[XS:%[a-z_0-9]+]] = py.getitem([[QT]], 1) : f32[
# CHECK-NEXT:  slimc.linear_w4a8([[XQ]], [[XS]], [[P]], [[S]], none, out_dtype=f32) : f32[{{.*}}, 32]  loc("model.layers.1.self_attn.k_proj")
# CHECK-NOT:   aten.linear
# CHECK:       loc("model.norm")
# CHECK:       aten.linear({{.*}} loc("lm_head")
