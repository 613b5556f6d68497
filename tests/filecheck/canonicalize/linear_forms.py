# RUN: slimc-opt %s --raw-capture --print-ir-before=canonicalize -p canonicalize | filecheck %s
"""canonicalize rewrites linears computed as addmm (GPT-2's Conv1D, weight [in, out]) and as
matmul with a transposed weight plus a bias (FalconLinear) to aten.linear; a product with a
weight of another module (the root's) is left alone."""

import torch
from torch import nn
from transformers.models.falcon.modeling_falcon import FalconLinear
from transformers.pytorch_utils import Conv1D


class LinearForms(nn.Module):
    """Linears written in the forms canonicalize rewrites."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(32, 16)  # nf=32 outputs, nx=16 inputs: weight [16, 32]
        self.dense = FalconLinear(32, 8, bias=True)  # weight [8, 32]
        self.readout = nn.Parameter(torch.randn(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(torch.relu(self.c_fc(x))) @ self.readout


def build():
    torch.manual_seed(0)
    return LinearForms().eval(), (torch.randn(2, 5, 16),)


# CHECK-LABEL: // -----// IR Dump Before canonicalize (1/1) //----- //
# CHECK:       [[FLAT:%[a-z_0-9]+]] = aten.view({{%[a-z_0-9]+}}, size=[-1, 16])
# CHECK:       aten.addmm({{%[a-z_0-9]+}}, [[FLAT]], {{%[a-z_0-9]+}}) : f32[10, 32]  loc("c_fc")
# CHECK:       aten.numpy_T({{%[a-z_0-9]+}}) : f32[32, 8]  loc("dense")
# CHECK:       aten.matmul(
# CHECK:       aten.add.Tensor(
#
# After: the weight of c_fc is held transposed ([out, in] = [32, 16]); both are aten.linear.
# CHECK:       // stage: aten
# CHECK-NEXT:  graph @forward([[IN:%[a-z_0-9]+]]: f32[2, 5, 16]) -> (f32[2, 5, 4]) {
# CHECK-DAG:   [[W1:%[a-z_0-9]+]] = const "c_fc.weight" : f32[32, 16]
# CHECK-DAG:   [[B1:%[a-z_0-9]+]] = const "c_fc.bias" : f32[32]
# CHECK-DAG:   [[W2:%[a-z_0-9]+]] = const "dense.weight" : f32[8, 32]
# CHECK-DAG:   [[B2:%[a-z_0-9]+]] = const "dense.bias" : f32[8]
# CHECK-DAG:   [[R:%[a-z_0-9]+]] = const "readout" : f32[8, 4]
# CHECK-NOT:   aten.addmm
# CHECK:       [[L1:%[a-z_0-9]+]] = aten.linear([[IN]], [[W1]], [[B1]]) : f32[2, 5, 32]  loc("c_fc")
# CHECK:       [[ACT:%[a-z_0-9]+]] = aten.relu([[L1]])
# CHECK-NOT:   aten.numpy_T
# CHECK:       [[L2:%[a-z_0-9]+]] = aten.linear([[ACT]], [[W2]], [[B2]]) : f32[2, 5, 8]  loc("dense")
# CHECK-NEXT:  [[OUT:%[a-z_0-9]+]] = aten.matmul([[L2]], [[R]]) : f32[2, 5, 4]
# CHECK-NEXT:  return [[OUT]]
