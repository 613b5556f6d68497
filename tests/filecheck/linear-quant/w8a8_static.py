# RUN: slimc-opt %s -p "linear-quant{scheme=w8a8}" | filecheck %s
"""linear-quant w8a8: int8 weights per channel, calibrated static per-tensor int8 inputs (QDQ)."""

import torch

from tests.models import tiny_llama


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_llama(seed=0, layers=2), None, calib


# CHECK-LABEL: // stage: qdq
# CHECK:       [[WQ:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.weight_q" : i8[64, 64]
# CHECK-NEXT:  [[WS:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.weight_scale" : f32[64, 1]
# CHECK-NEXT:  [[W:%[a-z_0-9]+]] = slimc.dequantize_affine([[WQ]], [[WS]], none, block_size=[1, -1], qmin=-128, qmax=127, out_dtype=f32) : f32[64, 64]
# CHECK-NEXT:  [[S:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.input_scale" : f32[1, 1, 1]
# CHECK-NEXT:  [[Z:%[a-z_0-9]+]] = const "model.layers.0.self_attn.q_proj.input_zero_point" : i32[1, 1, 1]
# CHECK-NEXT:  [[Q:%[a-z_0-9]+]] = slimc.quantize_affine([[X:%[a-z_0-9]+]], [[S]], [[Z]], block_size=[-1, -1, -1], qmin=-128, qmax=127, out_dtype=i8) : i8[s{{[0-9]+}}, s{{[0-9]+}}, 64]
# CHECK-NEXT:  [[DQ:%[a-z_0-9]+]] = slimc.dequantize_affine([[Q]], [[S]], [[Z]], block_size=[-1, -1, -1], qmin=-128, qmax=127, out_dtype=f32)
# CHECK-NEXT:  aten.linear([[DQ]], [[W]], none) : f32[{{.*}}, 64]  loc("model.layers.0.self_attn.q_proj")
#
# Activations are never quantized at run time in the static scheme.
# CHECK-NOT:   slimc.choose_qparams_affine
# CHECK:       const "model.layers.1.mlp.down_proj.input_scale" : f32[1, 1, 1]
# CHECK-NOT:   slimc.choose_qparams_affine
# CHECK:       return
