# RUN: slimc-opt %s -p "linear-quant{scheme=w4a16 group-size=32}" | filecheck %s
# RUN: slimc-opt %s -p "linear-quant{scheme=w4a16}" | filecheck %s --check-prefix=CHANNEL
"""linear-quant w4a16: int4 asymmetric weights per group of 32 (or per channel); inputs stay float."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# K=64 in groups of 32: two scales and zero points per output row, qmin=-8.
# CHECK-LABEL: // stage: qdq
# CHECK:       [[WQ:%[a-z_0-9]+]] = const "model.layers.0.mlp.gate_proj.weight_q" : i8[128, 64]
# CHECK-NEXT:  [[WS:%[a-z_0-9]+]] = const "model.layers.0.mlp.gate_proj.weight_scale" : f32[128, 2]
# CHECK-NEXT:  [[WZ:%[a-z_0-9]+]] = const "model.layers.0.mlp.gate_proj.weight_zero_point" : i8[128, 2]
# CHECK-NEXT:  [[W:%[a-z_0-9]+]] = slimc.dequantize_affine([[WQ]], [[WS]], [[WZ]], block_size=[1, 32], qmin=-8, qmax=7, out_dtype=f32) : f32[128, 64]
# CHECK-NEXT:  aten.linear([[X:%[a-z_0-9]+]], [[W]], none) : f32[{{.*}}, 128]  loc("model.layers.0.mlp.gate_proj")
# CHECK-NOT:   slimc.quantize_affine
# CHECK-NOT:   slimc.choose_qparams_affine
# CHECK:       return

# CHANNEL-LABEL: // stage: qdq
# CHANNEL:       const "model.layers.0.mlp.gate_proj.weight_scale" : f32[128, 1]
# CHANNEL:       slimc.dequantize_affine({{.*}}, block_size=[1, -1], qmin=-8, qmax=7, out_dtype=f32) : f32[128, 64]
