# RUN: slimc-opt %s --print-analyses 2>&1 | filecheck %s --check-prefix=GROUPS
# RUN: slimc-opt %s -p iter-smooth --track-error --pass-statistics 2>&1 | filecheck %s
"""iter-smooth on Gemma2: `x * (1 + w)` RMSNorms and sandwich norms (post-sublayer norms)."""

import torch

from tests.models import tiny_gemma2


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_gemma2(seed=0, layers=2), None, calib


# The pre-sublayer norms carry the scales; post_attention_layernorm and post_feedforward_layernorm
# only feed the residual and never appear.
# GROUPS-LABEL: linear-groups: 8 groups, 1 refused
# GROUPS-NEXT:    norm-linear model.layers.0.input_layernorm -> q_proj,k_proj,v_proj
# GROUPS-NEXT:    ov model.layers.0.self_attn.v_proj -> o_proj  [32 -> 64 channels]
# GROUPS-NEXT:    norm-linear model.layers.0.pre_feedforward_layernorm -> gate_proj,up_proj
# GROUPS-NEXT:    up-down model.layers.0.mlp.up_proj -> down_proj
# GROUPS-NOT:     post_
# GROUPS:         refused norm-linear at {{.*}} (tied weights)

# CHECK-LABEL: Pass statistics report
# CHECK:       iter-smooth
# CHECK-NEXT:    (4) smoothed norm-linear groups
# CHECK-NEXT:    (2) smoothed ov groups
# CHECK-NEXT:    (2) smoothed up-down groups
# CHECK-LABEL: numerics vs float model
# CHECK:       iter-smooth {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}
