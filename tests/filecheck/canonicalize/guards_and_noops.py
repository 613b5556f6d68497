# RUN: slimc-opt %s --raw-capture --print-ir-before=canonicalize -p canonicalize | filecheck %s
# RUN: slimc-opt %s | filecheck %s --check-prefix=CAPTURE
"""canonicalize removes export guards, runtime asserts and no-op casts/dropout/clones; keeps linear."""

import torch
from torch import nn


class NoOps(nn.Module):
    """A linear surrounded by no-op casts and guards."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)  # already f32: a no-op cast plus a metadata assert
        return self.fc(self.drop(x)).clone()


def build():
    torch.manual_seed(0)
    return NoOps().eval(), (torch.randn(2, 16),)


# The raw export still has the guard call, the assert and the no-ops.
# CHECK-LABEL: // -----// IR Dump Before canonicalize (1/1) //----- //
# CHECK:       call_module "_guards_fn"
# CHECK:       aten._assert_tensor_metadata([[X:%[a-z_0-9]+]], dtype=f32
# CHECK:       [[TO:%[a-z_0-9]+]] = aten.to.dtype([[X]], dtype=f32)
# CHECK:       aten.dropout([[TO]], p=0.1, train=false)
# CHECK:       aten.clone(
#
# After canonicalize only the linear is left, reading the input directly.
# CHECK:       // stage: aten
# CHECK-NEXT:  graph @forward([[IN:%[a-z_0-9]+]]: f32[2, 16]) -> (f32[2, 8]) {
# CHECK-NOT:   _guards_fn
# CHECK-NOT:   aten._assert
# CHECK-NOT:   aten.to.
# CHECK-NOT:   aten.dropout
# CHECK:       [[L:%[a-z_0-9]+]] = aten.linear([[IN]], {{%[a-z_0-9]+}}, {{%[a-z_0-9]+}}) : f32[2, 8]  loc("fc")
# CHECK-NOT:   aten.clone
# CHECK-NEXT:  return [[L]]

# Capture canonicalizes by default.
# CAPTURE:       graph @forward([[IN:%[a-z_0-9]+]]: f32[2, 16])
# CAPTURE-NOT:   _guards_fn
# CAPTURE-NOT:   aten._assert
# CAPTURE:       [[L:%[a-z_0-9]+]] = aten.linear([[IN]],
# CAPTURE-NEXT:  return [[L]]
