# RUN: slimc-opt %s -p "w8a16" | filecheck %s
# RUN: slimc-opt %s -p "w8a16{group-size=32}" | filecheck %s --check-prefix=GROUP
"""fuse-quantized-linear w8a16: slimc.linear_w8a16 on int8 weights (per channel or grouped)."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# CHECK-LABEL: // stage: fused
# CHECK-NOT:   aten.linear
# CHECK:       [[WQ:%[a-z_0-9]+]] = const "model.layers.0.mlp.down_proj.weight_q" : i8[64, 128]
# CHECK-NEXT:  [[WS:%[a-z_0-9]+]] = const "model.layers.0.mlp.down_proj.weight_scale" : f32[64, 1]
# CHECK-NEXT:  slimc.linear_w8a16({{%[a-z_0-9]+}}, [[WQ]], [[WS]], none, none, group_size=-1) : f32[{{.*}}, 64]  loc("model.layers.0.mlp.down_proj")
# CHECK-NOT:   aten.linear
# CHECK:       loc("model.norm")
# CHECK:       aten.linear({{.*}} loc("lm_head")

# GROUP-LABEL: // stage: fused
# GROUP:       slimc.linear_w8a16({{.*}}, group_size=32) : f32[{{.*}}, 64]  loc("model.layers.0.mlp.down_proj")
