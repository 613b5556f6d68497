# RUN: slimc-opt %s -p "flex-awq-ssz{grid-step=0.25 max-tokens=64}" --pass-statistics --track-error 2>&1 | filecheck %s
# RUN: not slimc-opt %s -p "flex-awq-ssz{weight-method=gptq}" 2>&1 | filecheck %s --check-prefix=BADMETHOD
"""flex-awq-ssz: alpha searched against the real int4 weight quantizer, s = mean|x|^alpha; exact."""

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
# CHECK:       flex-awq-ssz
# CHECK:         mean alpha
# CHECK:         (4) smoothed norm-linear groups
# CHECK-NEXT:    (2) smoothed ov groups
# CHECK-NEXT:    (2) smoothed up-down groups
# CHECK-LABEL: numerics vs float model
# CHECK:       flex-awq-ssz{{.*}} {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}

# BADMETHOD: slimc-opt: error: option 'weight-method' of pass 'flex-awq-ssz': bad value 'gptq'
