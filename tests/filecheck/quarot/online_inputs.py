# RUN: slimc-opt %s -p "quarot{online-inputs=down_proj}" --pass-statistics 2>&1 | filecheck %s
"""quarot{online-inputs=...}: a run-time Hadamard in front of down_proj, its inverse in the weight."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# The down_proj input (intermediate size 128) is rotated at run time by its own Hadamard.
# CHECK-LABEL: // stage: aten
# CHECK:       [[S:%[a-z_0-9]+]] = const "model.layers.0.mlp.down_proj.input_rotation_signs" : f32[128]
# CHECK:       [[R:%[a-z_0-9]+]] = slimc.hadamard([[X:%[a-z_0-9]+]], [[S]]) : f32[{{.*}}, 128]  loc("model.layers.0.mlp.down_proj")
# CHECK-NEXT:  aten.linear([[R]], {{%[a-z_0-9]+}}, none) : f32[{{.*}}, 64]  loc("model.layers.0.mlp.down_proj")
# CHECK:       slimc.hadamard({{.*}} loc("model.layers.1.mlp.down_proj")
# CHECK:       quarot
# CHECK:       (2) online input rotations
