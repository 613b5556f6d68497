# RUN: slimc-opt %s --print-analyses 2>&1 | filecheck %s --check-prefix=GROUPS
# RUN: slimc-opt %s -p smooth-quant --pass-statistics 2>&1 | filecheck %s
"""smooth-quant on OLMo: its LayerNorms have no weight, so no norm-linear group can carry a scale;
the analysis says so per norm and the pass smooths nothing (a warning, the graph unchanged)."""

import torch

from tests.smooth.fused_models import tiny_olmo


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_olmo(seed=0), None, calib


# GROUPS-LABEL: linear-groups: 4 groups, 5 refused
# GROUPS:         refused norm-linear at model.layers.0.input_layernorm -> q_proj,k_proj,v_proj: the norm has no weight to absorb a scale (aten.layer_norm without weight) and its output has no other exact fold
# GROUPS-NEXT:    refused norm-linear at model.layers.0.post_attention_layernorm -> gate_proj,up_proj: the norm has no weight
# GROUPS:         refused norm-linear at model.norm -> lm_head: the norm has no weight

# CHECK:       smooth-quant: no group selected (kinds norm-linear); refused: norm-linear at model.layers.0.input_layernorm -> q_proj,k_proj,v_proj: the norm has no weight to absorb a scale {{.*}} (and 4 more)
# CHECK-NOT:   smoothed norm-linear groups
