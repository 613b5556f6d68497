# RUN: slimc-opt %s -p "linear-quant{scheme=w8a16}" | filecheck %s --check-prefix=DEFAULT
# RUN: slimc-opt %s -p 'linear-quant{scheme=w8a16 only="layers.0.*"}' | filecheck %s --check-prefix=ONLY
# RUN: slimc-opt %s -p 'linear-quant{scheme=w8a16 ignore="*.mlp.*"}' | filecheck %s --check-prefix=IGNORE
"""linear-quant chooses linears by module-path globs: `ignore` (default lm_head) and `only`."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# By default lm_head keeps its float weight; every decoder linear is quantized.
# DEFAULT-LABEL: // stage: qdq
# DEFAULT:       [[LM:%[a-z_0-9]+]] = const "lm_head.weight" : f32[128, 64]
# DEFAULT:       slimc.dequantize_affine({{.*}} loc("model.layers.1.mlp.down_proj")
# DEFAULT-NOT:   slimc.dequantize_affine
# DEFAULT:       aten.linear({{%[a-z_0-9]+}}, [[LM]], none) : f32[{{.*}}, 128]  loc("lm_head")

# only="layers.0.*": layer 0 quantized, layer 1 left float.
# ONLY-LABEL: // stage: qdq
# ONLY:       [[W:%[a-z_0-9]+]] = const "model.layers.1.self_attn.q_proj.weight" : f32[64, 64]
# ONLY:       slimc.dequantize_affine({{.*}} loc("model.layers.0.mlp.down_proj")
# ONLY-NOT:   slimc.dequantize_affine
# ONLY:       aten.linear({{%[a-z_0-9]+}}, [[W]], none) {{.*}} loc("model.layers.1.self_attn.q_proj")
# ONLY-NOT:   slimc.dequantize_affine
# ONLY:       return

# ignore="*.mlp.*" replaces the default: MLPs stay float, lm_head is quantized now.
# IGNORE-LABEL: // stage: qdq
# IGNORE:       slimc.dequantize_affine({{.*}} loc("model.layers.0.self_attn.o_proj")
# IGNORE-NOT:   slimc.dequantize_affine
# IGNORE:       aten.linear({{.*}} loc("model.layers.0.mlp.down_proj")
# IGNORE:       slimc.dequantize_affine({{.*}} loc("model.layers.1.self_attn.q_proj")
# IGNORE:       [[W:%[a-z_0-9]+]] = slimc.dequantize_affine({{.*}} loc("lm_head")
# IGNORE-NEXT:  aten.linear({{%[a-z_0-9]+}}, [[W]], none) {{.*}} loc("lm_head")
