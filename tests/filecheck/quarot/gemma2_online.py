# RUN: not slimc-opt %s -p "quarot{online=never}" 2>&1 | filecheck %s --check-prefix=REFUSED
# RUN: slimc-opt %s -p quarot --pass-statistics --track-error 2>&1 | filecheck %s
# RUN: slimc-opt %s -p "quarot{online=true}" --pass-statistics 2>&1 | filecheck %s --check-prefix=ALIAS
# RUN: slimc-opt --print-pipeline -p "quarot,quarot{online=true},quarot{online=false}" | filecheck %s --check-prefix=PIPELINE
"""quarot on Gemma2: sandwich norms rotated online by slimc.hadamard (online=auto); never refuses."""

from tests.models import tiny_gemma2


def build():
    return tiny_gemma2(seed=0, layers=2)


# REFUSED: slimc-opt: error: quarot: type_as_1 (model.layers.0.post_attention_layernorm) is added to the residual stream at add_12, but aten.mul at model.layers.0.post_attention_layernorm is not a linear, cast or move: no weight can absorb the rotation offline (quarot{online=auto} rotates it at run time)

# The post-sublayer norms' outputs are rotated at run time before each residual add; the
# pre-sublayer norms (`x * (1 + w)`) are fused into their linears.
# CHECK-LABEL: // stage: aten
# CHECK:       %[[NORMED:[a-z0-9_]+]] = aten.type_as({{.*}} loc("model.layers.0.post_attention_layernorm")
# CHECK-NEXT:  %[[SIGNS:[a-z0-9_]+]] = const "model.layers.0.post_attention_layernorm.rotation_signs" : f32[64]
# CHECK-NEXT:  %[[ROT:[a-z0-9_]+]] = slimc.hadamard(%[[NORMED]], %[[SIGNS]]) : f32[s{{[0-9]+}}, s{{[0-9]+}}, 64]  loc("model.layers.0.post_attention_layernorm")
# CHECK-NEXT:  aten.add.Tensor(%{{[a-z0-9_]+}}, %[[ROT]]) {{.*}} loc("model.layers.0")
# CHECK-COUNT-3: slimc.hadamard(
#
# CHECK-LABEL: Pass statistics report
# CHECK:       quarot
# CHECK-NEXT:    (5) fused norms
# CHECK-NEXT:    (4) online rotations
# CHECK-LABEL: numerics vs float model
# CHECK:       quarot {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}

# `online=true` is the old spelling of `always`: the same four online rotations.
# ALIAS-LABEL: Pass statistics report
# ALIAS:         (4) online rotations

# PIPELINE: quarot{seed=1234 rotate-heads=true online=auto online-inputs=""},quarot{seed=1234 rotate-heads=true online=always online-inputs=""},quarot{seed=1234 rotate-heads=true online=never online-inputs=""}
