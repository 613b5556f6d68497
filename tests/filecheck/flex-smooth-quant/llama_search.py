# RUN: slimc-opt %s -p "flex-smooth-quant{grid-step=0.25 max-tokens=64}" --pass-statistics --track-error 2>&1 | filecheck %s
# RUN: slimc-opt %s -p "flex-smooth-quant{alpha=0.5 beta=0.5 enable-subgraph-type=norm-linear}" --pass-statistics 2>&1 | filecheck %s --check-prefix=FIXED
# RUN: not slimc-opt %s -p "flex-smooth-quant{grid-step=0}" 2>&1 | filecheck %s --check-prefix=BADSTEP
"""flex-smooth-quant: alpha/beta grid search per group, measured with the target quantizers; exact."""

import torch

from tests.models import tiny_llama


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_llama(seed=0, layers=2), None, calib


# CHECK-LABEL: // stage: aten
# CHECK-NOT:   slimc.
# CHECK:       return
# CHECK-LABEL: Pass statistics report
# CHECK:       flex-smooth-quant
# CHECK:         mean alpha
# CHECK:         mean beta
# CHECK:         (4) smoothed norm-linear groups
# CHECK-NEXT:    (2) smoothed ov groups
# CHECK-NEXT:    (2) smoothed up-down groups
# CHECK-LABEL: numerics vs float model
# CHECK:       flex-smooth-quant{{.*}} {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}

# FIXED-LABEL: Pass statistics report
# FIXED:       (0.5) mean alpha
# FIXED-NEXT:  (0.5) mean beta
# FIXED:       (4) smoothed norm-linear groups
# FIXED-NOT:   ov groups

# BADSTEP: slimc-opt: error: {{.*}}grid-step
