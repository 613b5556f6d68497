# RUN: slimc-opt %s -p "w8a8-dynamic,lower-cpu{int8-engine=onednn}" | filecheck %s
# RUN: slimc-opt %s -p "w8a8-dynamic,lower-cpu{int8-engine=int_mm}" | filecheck %s --check-prefix=INTMM
# RUN: slimc-opt %s -p "w4a16{group-size=32},lower-cpu" | filecheck %s --check-prefix=W4A16
# RUN: slimc-opt %s -p "w4a4,lower-cpu{int8-engine=int_mm}" | filecheck %s --check-prefix=W4A4
"""lower-cpu: per-token int8 linears on oneDNN or torch._int_mm, int4 weight-only on int4pack_mm."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# The per-token quantization moves into the kernel op: none is left in the graph.
# CHECK-LABEL: // stage: kernel
# CHECK-NOT:   slimc.quantize_per_token
# CHECK:       [[S:%[a-z_0-9]+]] = const "model.layers.0.mlp.down_proj.cpu_w_scale" : f32[64]
# CHECK-NEXT:  slimc.cpu_linear_int8_dynamic({{%[a-z_0-9]+}}, %model_layers_0_mlp_down_proj_weight_q, [[S]], none, qmin=-128, qmax=127, engine="onednn") : f32[{{.*}}, 64]  {kernel = "cpu.onednn", config = {act = 'per-token [-128, 127]', epilogue = 'compiled'}}  loc("model.layers.0.mlp.down_proj")
# CHECK-NOT:   slimc.linear_w8a8
# CHECK-NOT:   slimc.quantize_per_token
# CHECK:       aten.linear({{.*}} loc("lm_head")

# The same product on torch._int_mm (the default engine argument, not printed).
# INTMM-LABEL: // stage: kernel
# INTMM:       slimc.cpu_linear_int8_dynamic({{%[a-z_0-9]+}}, %model_layers_0_mlp_down_proj_weight_q, {{%[a-z_0-9]+}}, none, qmin=-128, qmax=127) : f32[{{.*}}, 64]  {kernel = "cpu.int_mm", {{.*}}loc("model.layers.0.mlp.down_proj")

# int4 weights: the int4pack layout and bf16 (scale, zero) pairs per 32-wide group.
# W4A16-LABEL: // stage: kernel
# W4A16:       [[P:%[a-z_0-9]+]] = const "model.layers.0.mlp.down_proj.cpu_int4pack" : u8[64, 64]
# W4A16-NEXT:  [[SZ:%[a-z_0-9]+]] = const "model.layers.0.mlp.down_proj.cpu_scales_and_zeros" : bf16[4, 64, 2]
# W4A16-NEXT:  slimc.cpu_linear_int4_weight({{%[a-z_0-9]+}}, [[P]], [[SZ]], %model_layers_0_mlp_down_proj_weight_packed, none, group_size=32, m_threshold=48) : f32[{{.*}}, 64]  {kernel = "cpu.int4pack_mm", config = {dtype = 'bf16', group = 32, m_threshold = 48}}  loc("model.layers.0.mlp.down_proj")
# W4A16-NOT:   slimc.linear_w4a16

# int4 activations: the same int8 kernel with the [-8, 7] range, int4 weights widened once.
# W4A4-LABEL: // stage: kernel
# W4A4:       [[W:%[a-z_0-9]+]] = const "model.layers.1.self_attn.k_proj.cpu_qweight_int8" : i8[32, 64]
# W4A4:       slimc.cpu_linear_int8_dynamic({{%[a-z_0-9]+}}, [[W]], {{%[a-z_0-9]+}}, none, qmin=-8, qmax=7) {{.*}} {kernel = "cpu.int_mm", config = {act = 'per-token [-8, 7]', epilogue = 'compiled'}}  loc("model.layers.1.self_attn.k_proj")
# W4A4-NOT:   slimc.linear_w4a8
