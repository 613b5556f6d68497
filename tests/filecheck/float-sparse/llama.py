# RUN: slimc-opt %s -p float-sparse --pass-statistics --track-error 2>&1 | filecheck %s
# RUN: slimc-opt %s -p 'float-sparse{only="layers.1.*" round-mantissa=false sparse-ratio=0.5},w8a8-dynamic' --pass-statistics 2>&1 | filecheck %s --check-prefix=ONLY
# RUN: not slimc-opt %s -p "float-sparse{sparse-ratio=1.0}" 2>&1 | filecheck %s --check-prefix=BADRATIO
"""float-sparse: weights pruned by ADMM and rounded in place; the graph keeps aten.linear (lossy)."""

import torch

from tests.models import tiny_llama


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 32), generator=gen) for _ in range(4)]
    return tiny_llama(seed=0, layers=2), None, calib


# The program stays float at the ATEN stage: same constants, same ops, new weight values.
# CHECK-LABEL: // stage: aten
# CHECK:       %[[W:[a-z0-9_]+]] = const "model.layers.0.self_attn.q_proj.weight" : f32[64, 64]
# CHECK-NOT:   slimc.
# CHECK:       aten.linear(%{{[a-z0-9_]+}}, %[[W]], none) : f32[{{.*}}, 64]  loc("model.layers.0.self_attn.q_proj")
# CHECK:       aten.linear({{.*}} loc("lm_head")
# CHECK-NEXT:  return
#
# 14 linears (lm_head ignored) with 30% zeros each; 2% of the weights keep full fp16.
# CHECK-LABEL: Pass statistics report
# CHECK:       float-sparse
# CHECK-NEXT:    (30.0022) achieved sparsity (%)
# CHECK-NEXT:    (14) linears where ADMM beats magnitude pruning
# CHECK-NEXT:    ({{[0-9.e-]+}}) mean relative output error (ADMM)
# CHECK-NEXT:    ({{[0-9.e-]+}}) mean relative output error (after rounding)
# CHECK-NEXT:    ({{[0-9.e-]+}}) mean relative output error (magnitude pruning)
# CHECK-NEXT:    (14) sparsified linears
# CHECK-NEXT:    (1476) weights kept in fp16 (precision protection)
# CHECK-LABEL: numerics vs float model
# CHECK:       float-sparse {{ +}}{{[0-9]+\.[0-9][0-9]}}

# Only layer 1, half the weights, no rounding; quantization can follow.
# ONLY-LABEL: // stage: fused
# ONLY-LABEL: Pass statistics report
# ONLY:       float-sparse
# ONLY-NEXT:    (50) achieved sparsity (%)
# ONLY-NEXT:    (7) linears where ADMM beats magnitude pruning
# ONLY-NEXT:    ({{[0-9.e-]+}}) mean relative output error (ADMM)
# ONLY-NEXT:    ({{[0-9.e-]+}}) mean relative output error (magnitude pruning)
# ONLY-NEXT:    (7) sparsified linears
# ONLY-NEXT:  linear-quant
# ONLY-NEXT:    (14) quantized linears (w8a8-dynamic)

# BADRATIO: slimc-opt: error: pass 'float-sparse': sparse-ratio must be in [0, 1), got 1.0
