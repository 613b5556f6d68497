# RUN: slimc-opt %s -p "ssz{symmetric=true weighting=none}" --pass-statistics 2>&1 | filecheck %s
"""ssz: the QDQ form of linear-quant with least-squares-refitted weight ranges (no data)."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# Symmetric int4 per channel: one scale per output channel and no zero point.
# CHECK-LABEL: // stage: qdq
# CHECK:       [[WQ:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.weight_q" : i8[64, 64]
# CHECK-NEXT:  [[WS:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.weight_scale" : f32[64, 1]
# CHECK-NEXT:  [[W:%[a-z_0-9]+]] = slimc.dequantize_affine([[WQ]], [[WS]], none, block_size=[1, -1], qmin=-8, qmax=7, out_dtype=f32) : f32[64, 64]
# CHECK-NEXT:  aten.linear({{%[a-z_0-9]+}}, [[W]], none) : f32[{{.*}}, 64]  loc("model.layers.0.self_attn.q_proj")
# CHECK:       ssz
# CHECK-DAG:   weight squared error (sum over linears)
# CHECK-DAG:   weight squared error of MinMax (sum over linears)
