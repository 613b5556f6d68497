# RUN: slimc-opt %s --print-analyses 2>&1 | filecheck %s --check-prefix=GROUPS
# RUN: slimc-opt %s -p iter-smooth --pass-statistics --track-error 2>&1 | filecheck %s
"""iter-smooth on Phi-3: the v part of the fused qkv_proj and the up half of gate_up_proj are
smoothed (only their rows scaled); exact."""

import torch

from tests.smooth.fused_models import tiny_phi3


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_phi3(seed=0), None, calib


# GROUPS-LABEL: linear-groups: 9 groups, 0 refused
# GROUPS-NEXT:    norm-linear model.layers.0.input_layernorm -> qkv_proj
# GROUPS-NEXT:    ov model.layers.0.self_attn.qkv_proj -> o_proj  [rows 96:128 of 128 -> 64 channels]
# GROUPS-NEXT:    norm-linear model.layers.0.post_attention_layernorm -> gate_up_proj
# GROUPS-NEXT:    up-down model.layers.0.mlp.gate_up_proj -> down_proj  [rows 128:256 of 256]

# CHECK-LABEL: Pass statistics report
# CHECK:         (4) smoothed norm-linear groups
# CHECK-NEXT:    (2) smoothed ov groups
# CHECK-NEXT:    (2) smoothed up-down groups
# CHECK-LABEL: numerics vs float model
# CHECK:       iter-smooth {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}
