# RUN: slimc-opt %s -p "gptq{group-size=32}" --pass-statistics 2>&1 | filecheck %s
# RUN: slimc-opt %s -p "gptq{scheme=w8a8-dynamic act-order=false range-steps=0}" | filecheck %s --check-prefix=DYN
"""gptq: the QDQ form of linear-quant, weights rounded against calibration Hessians."""

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
# CHECK:       aten.linear({{.*}} loc("lm_head")
# The statistics compare the Hessian-weighted output error with plain rounding's.
# CHECK:       gptq
# CHECK-DAG:   output error (sum over linears)
# CHECK-DAG:   output error of RTN (sum over linears)
# CHECK-DAG:   (14) quantized linears (w4a16)

# With a dynamic scheme the activations are quantized per token at run time, as in linear-quant.
# DYN-LABEL: // stage: qdq
# DYN:       slimc.choose_qparams_affine({{.*}}qmin=-128, qmax=127, symmetric=true)
# DYN:       aten.linear({{.*}} loc("model.layers.0.self_attn.q_proj")
