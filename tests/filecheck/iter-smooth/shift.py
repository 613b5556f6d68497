# RUN: slimc-opt %s -p "iter-smooth{shift=true}" --pass-statistics --track-error 2>&1 | filecheck %s
"""iter-smooth shift=true: each norm-linear input is centred by a bias after the norm; linears get biases."""

import torch

from tests.models import tiny_llama


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_llama(seed=0, layers=2), None, calib


# CHECK-LABEL: // stage: aten
# CHECK:       %[[W:.*]] = aten.mul.Tensor(%model_layers_0_input_layernorm_weight, {{.*}}) {{.*}} loc("model.layers.0.input_layernorm")
# CHECK:       const "model.layers.0.input_layernorm.shift_bias" : f32[64]  loc("model.layers.0.input_layernorm")
# CHECK-NEXT:  %[[X:.*]] = aten.add.Tensor(%[[W]], %model_layers_0_input_layernorm_shift_bias) {{.*}} loc("model.layers.0.input_layernorm")
# CHECK:       const "model.layers.0.self_attn.k_proj.bias" : f32[32]  loc("model.layers.0.self_attn.k_proj")
# CHECK:       aten.linear(%[[X]], %model_layers_0_self_attn_q_proj_weight, %model_layers_0_self_attn_q_proj_bias)
#
# CHECK-LABEL: Pass statistics report
# CHECK:       iter-smooth
# CHECK-NEXT:    (4) shifts folded into biases
# CHECK-NEXT:    (4) smoothed norm-linear groups
#
# Exact: float rounding only.
# CHECK-LABEL: numerics vs float model
# CHECK:       iter-smooth{shift=true} {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}
