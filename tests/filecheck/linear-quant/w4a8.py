# RUN: slimc-opt %s -p "linear-quant{scheme=w4a8}" | filecheck %s
"""linear-quant w4a8: symmetric int4 weights per channel, dynamic per-token int8 inputs."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# CHECK-LABEL: // stage: qdq
# CHECK:       [[W:%[a-z_0-9]+]] = slimc.dequantize_affine({{%[a-z_0-9]+}}, {{%[a-z_0-9]+}}, none, block_size=[1, -1], qmin=-8, qmax=7, out_dtype=f32) : f32[64, 128]
# CHECK-SAME:  loc("model.layers.0.mlp.down_proj")
# CHECK-NEXT:  [[QP:%[a-z_0-9]+]] = slimc.choose_qparams_affine([[X:%[a-z_0-9]+]], block_size=[1, 1, -1], qmin=-128, qmax=127, symmetric=true)
# CHECK:       [[Q:%[a-z_0-9]+]] = slimc.quantize_affine([[X]], {{.*}} out_dtype=i8)
# CHECK-NEXT:  [[DQ:%[a-z_0-9]+]] = slimc.dequantize_affine([[Q]],
# CHECK-NEXT:  aten.linear([[DQ]], [[W]], none) {{.*}} loc("model.layers.0.mlp.down_proj")
