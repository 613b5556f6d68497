# RUN: slimc-opt %s --print-analyses 2>&1 | filecheck %s --check-prefix=GROUPS
# RUN: slimc-opt %s -p "smooth-quant{enable-subgraph-type=norm-linear,ov}" --pass-statistics --track-error 2>&1 | filecheck %s
"""smooth-quant on OPT: LayerNorms with biases carry the scale; v_proj's bias is divided too."""

import torch

from tests.models import tiny_opt


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_opt(seed=0, layers=2), None, calib


# GROUPS-LABEL: linear-groups: 6 groups, 1 refused
# GROUPS-NEXT:    norm-linear model.decoder.layers.0.self_attn_layer_norm -> q_proj,k_proj,v_proj
# GROUPS-NEXT:    ov model.decoder.layers.0.self_attn.v_proj -> out_proj
# GROUPS-NEXT:    norm-linear model.decoder.layers.0.final_layer_norm -> fc1
# GROUPS:         refused norm-linear at model.decoder.final_layer_norm -> lm_head: weight lm_head.weight {{.*}} (tied weights)

# CHECK-LABEL: Pass statistics report
# CHECK:         (4) smoothed norm-linear groups
# CHECK-NEXT:    (2) smoothed ov groups
# CHECK-LABEL: numerics vs float model
# CHECK:       smooth-quant{enable-subgraph-type={{[^ ]*}} {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}
