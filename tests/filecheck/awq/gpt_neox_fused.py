# RUN: slimc-opt %s --print-analyses 2>&1 | filecheck %s --check-prefix=GROUPS
# RUN: slimc-opt %s -p "awq{n-grid=4 group-size=32}" --pass-statistics --track-error 2>&1 | filecheck %s
"""awq on GPT-NeoX: query_key_value is viewed to heads and split, so the v rows are interleaved per
head (found by probing, not assumed); the ov groups scale those rows only. Exact in float."""

import torch

from tests.smooth.fused_models import tiny_gpt_neox


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_gpt_neox(seed=0), None, calib


# GROUPS-LABEL: linear-groups: 7 groups, 0 refused
# GROUPS-NEXT:    norm-linear gpt_neox.layers.0.input_layernorm -> query_key_value
# GROUPS-NEXT:    ov gpt_neox.layers.0.attention.query_key_value -> dense  [rows 32:48,80:96,128:144,176:192 of 192]

# CHECK-LABEL: Pass statistics report
# CHECK:         awq
# CHECK-DAG:     (4) smoothed norm-linear groups
# CHECK-DAG:     (2) smoothed ov groups
# CHECK-LABEL: numerics vs float model
# CHECK:       awq{n-grid=4 group-size=32} {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}
