# RUN: slimc-opt %s -p "awq{n-grid=4 search-samples=2 group-size=32}" --pass-statistics --track-error 2>&1 | filecheck %s
# RUN: slimc-opt %s -p "w4a16-awq{n-grid=4 search-samples=2 group-size=32}" --pass-statistics 2>&1 | filecheck %s --check-prefix=RECIPE
"""awq: scale exponent searched per group against the int4 weight quantizer on module-region outputs."""

import torch

from tests.models import tiny_llama


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_llama(seed=0, layers=2), None, calib


# Smoothing alone keeps the program float and exact.
# CHECK-LABEL: // stage: aten
# CHECK-NOT:   slimc.
# CHECK:       return
# CHECK-LABEL: Pass statistics report
# CHECK:       awq
# CHECK:         mean chosen ratio
# CHECK:         (4) smoothed norm-linear groups
# CHECK-NEXT:    (2) smoothed ov groups
# CHECK-NEXT:    (2) smoothed up-down groups
# CHECK-LABEL: numerics vs float model
# CHECK:       awq{{.*}} {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}

# The recipe forwards group-size to both the search and the quantizer.
# RECIPE-LABEL: // stage: fused
# RECIPE:       slimc.linear_w4a16({{.*}}group_size=32{{.*}} loc("model.layers.0.self_attn.q_proj")
# RECIPE-LABEL: Pass statistics report
# RECIPE:       awq
# RECIPE:       linear-quant
# RECIPE-NEXT:    (14) quantized linears (w4a16)
