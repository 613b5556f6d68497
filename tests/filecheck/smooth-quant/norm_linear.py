# RUN: slimc-opt %s -p smooth-quant --pass-statistics --track-error 2>&1 | filecheck %s
# RUN: slimc-opt %s -p "smooth-quant{alpha=0.8 enable-subgraph-type=norm-linear,up-down}" --pass-statistics 2>&1 | filecheck %s --check-prefix=KINDS
# RUN: not slimc-opt %s -p "smooth-quant{enable-subgraph-type=qkv}" 2>&1 | filecheck %s --check-prefix=BADKIND
"""smooth-quant: `s = A^alpha / W^(1-alpha)` folded into each norm and the linears reading it."""

import torch

from tests.models import tiny_llama


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_llama(seed=0, layers=2), None, calib


# By default only norm-linear groups: q/k/v and gate/up of both layers (lm_head is excluded).
# CHECK-LABEL: // stage: aten
# CHECK-NOT:   slimc.
# CHECK:       return
# CHECK-LABEL: Pass statistics report
# CHECK:       smooth-quant
# CHECK-NEXT:    (4) smoothed norm-linear groups
# CHECK-NOT:     smoothed ov groups
# CHECK-LABEL: numerics vs float model
# CHECK:       smooth-quant {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}

# KINDS-LABEL: Pass statistics report
# KINDS:       smooth-quant
# KINDS-NEXT:    (4) smoothed norm-linear groups
# KINDS-NEXT:    (2) smoothed up-down groups

# BADKIND: slimc-opt: error: option 'enable-subgraph-type' of pass 'smooth-quant': bad value 'qkv'
