# RUN: slimc-opt %s -p "linear-quant{scheme=w8a8},fuse-quantized-linear" | filecheck %s
# RUN: slimc-opt %s -p "linear-quant{scheme=w8a8-dynamic},fuse-quantized-linear" | filecheck %s --check-prefix=DYN
"""fuse-quantized-linear w8a8: one slimc.linear_w8a8 on int8 inputs and weights per linear."""

import torch

from tests.models import tiny_llama


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_llama(seed=0, layers=2), None, calib


# Static: the calibrated quantize_affine feeds the fused op; no dequantize is left.
# CHECK-LABEL: // stage: fused
# CHECK-NOT:   aten.linear
# CHECK:       [[WQ:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.weight_q" : i8[64, 64]
# CHECK-NEXT:  [[WS:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.weight_scale" : f32[64, 1]
# CHECK-NEXT:  [[S:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.input_scale"
# CHECK-NEXT:  [[Z:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.input_zero_point"
# CHECK-NEXT:  [[Q:%[a-z_0-9]+]] = slimc.quantize_affine({{%[a-z_0-9]+}}, [[S]], [[Z]], {{.*}} out_dtype=i8) : i8[
# CHECK-NEXT:  slimc.linear_w8a8([[Q]], [[S]], [[Z]], [[WQ]], [[WS]], none, out_dtype=f32) : f32[{{.*}}, 64]  loc("model.layers.0.self_attn.q_proj")
# CHECK-NOT:   slimc.dequantize_affine
# CHECK-NOT:   aten.linear
# CHECK:       slimc.linear_w8a8({{.*}} loc("model.layers.1.mlp.down_proj")
# CHECK-NOT:   slimc.dequantize_affine
# CHECK:       aten.linear({{.*}} loc("lm_head")

# Dynamic: per-token quantization at run time, fused.
# DYN-LABEL: // stage: fused
# DYN-NOT:   aten.linear
# DYN:       [[QT:%[a-z_0-9]+]] = slimc.quantize_per_token({{%[a-z_0-9]+}}) : (i8[{{.*}}, 64], f32[{{.*}}, 1])
# DYN-NEXT:  [[XQ:%[a-z_0-9]+]] = py.getitem([[QT]], 0)
# DYN-NEXT:  [[XS:%[a-z_0-9]+]] = py.getitem([[QT]], 1)
# DYN-NEXT:  slimc.linear_w8a8([[XQ]], [[XS]], none, {{%[a-z_0-9]+}}, {{%[a-z_0-9]+}}, none, out_dtype=f32) {{.*}} loc("model.layers.0.self_attn.q_proj")
# DYN-NOT:   slimc.choose_qparams_affine
# DYN-NOT:   slimc.dequantize_affine
# DYN-NOT:   aten.linear
# DYN:       loc("model.norm")
# DYN:       aten.linear({{.*}} loc("lm_head")
