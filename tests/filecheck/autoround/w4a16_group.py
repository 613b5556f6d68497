# RUN: slimc-opt %s -p "autoround{group-size=32 iters=4 seqlen=64}" --pass-statistics 2>&1 | filecheck %s
# RUN: slimc-opt %s -p "autoround{scheme=w4a4 iters=2 seqlen=64 minmax-tuning=false}" | filecheck %s --check-prefix=DYN
"""autoround: the QDQ form of linear-quant, rounding and ranges learned per decoder layer."""

import torch

from tests.models import tiny_llama


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 32), generator=gen) for _ in range(4)]
    return tiny_llama(seed=0, layers=2), None, calib


# Default scheme w4a16: asymmetric int4 codes with a zero point per group of 32 along K.
# CHECK-LABEL: // stage: qdq
# CHECK:       [[WQ:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.weight_q" : i8[64, 64]
# CHECK-NEXT:  [[WS:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.weight_scale" : f32[64, 2]
# CHECK-NEXT:  [[WZ:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.weight_zero_point" : i8[64, 2]
# CHECK-NEXT:  [[W:%[a-z_0-9]+]] = slimc.dequantize_affine([[WQ]], [[WS]], [[WZ]], block_size=[1, 32], qmin=-8, qmax=7, out_dtype=f32) : f32[64, 64]
# CHECK-NEXT:  aten.linear({{%[a-z_0-9]+}}, [[W]], none) : f32[{{.*}}, 64]  loc("model.layers.0.self_attn.q_proj")
# CHECK:       aten.linear({{.*}} loc("model.layers.1.mlp.down_proj")
# lm_head is left in float (linear-quant's default ignore list).
# CHECK:       aten.linear({{%[a-z_0-9]+}}, {{%[a-z_0-9]+}}, none) : f32[{{.*}}, 128]  loc("lm_head")
# The statistics compare each layer's output loss with plain rounding's.
# CHECK:       autoround
# CHECK-DAG:   layer output loss (sum over layers)
# CHECK-DAG:   layer output loss of RTN (sum over layers)
# CHECK-DAG:   (14) quantized linears (w4a16)

# With w4a4 the activations are quantized per token to int4 at run time, as in linear-quant;
# weights are symmetric int4 per channel (no zero point).
# DYN-LABEL: // stage: qdq
# DYN:       const "model.layers.0.self_attn.q_proj.weight_scale" : f32[64, 1]
# DYN-NEXT:  slimc.dequantize_affine({{%[a-z_0-9]+}}, {{%[a-z_0-9]+}}, none, block_size=[1, -1], qmin=-8, qmax=7, out_dtype=f32)
# DYN:       slimc.choose_qparams_affine({{.*}}qmin=-8, qmax=7, symmetric=true)
# DYN:       aten.linear({{.*}} loc("model.layers.0.self_attn.q_proj")
