# RUN: slimc-opt %s -p "linear-quant{scheme=w8a16}" | filecheck %s
# RUN: slimc-opt %s -p "linear-quant{scheme=w8a16 group-size=16 symmetric=false}" | filecheck %s --check-prefix=GROUP
"""linear-quant w8a16: int8 weights (symmetric per channel by default, or grouped); float inputs."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# CHECK-LABEL: // stage: qdq
# CHECK:       [[WQ:%[a-z_0-9]+]] = const "model.layers.1.self_attn.o_proj.weight_q" : i8[64, 64]
# CHECK-NEXT:  [[WS:%[a-z_0-9]+]] = const "model.layers.1.self_attn.o_proj.weight_scale" : f32[64, 1]
# CHECK-NEXT:  [[W:%[a-z_0-9]+]] = slimc.dequantize_affine([[WQ]], [[WS]], none, block_size=[1, -1], qmin=-128, qmax=127, out_dtype=f32)
# CHECK-NEXT:  aten.linear({{%[a-z_0-9]+}}, [[W]], none) {{.*}} loc("model.layers.1.self_attn.o_proj")
# CHECK-NOT:   slimc.quantize_affine

# GROUP-LABEL: // stage: qdq
# GROUP:       const "model.layers.1.self_attn.o_proj.weight_scale" : f32[64, 4]
# GROUP-NEXT:  const "model.layers.1.self_attn.o_proj.weight_zero_point" : i8[64, 4]
# GROUP-NEXT:  slimc.dequantize_affine({{.*}}, block_size=[1, 16], qmin=-128, qmax=127, out_dtype=f32)
