# RUN: slimc-opt %s -p quarot --pass-statistics --track-error 2>&1 | filecheck %s
# RUN: slimc-opt %s -p "quarot{rotate-heads=false seed=7}" --pass-statistics 2>&1 | filecheck %s --check-prefix=NOHEADS
# RUN: slimc-opt %s:opt -p quarot --pass-statistics --track-error 2>&1 | filecheck %s --check-prefix=LAYERNORM
"""quarot on Llama (tied embeddings, GQA 4/2): exact, lm_head untied, no op added; OPT mean-baked."""

from tests.models import tiny_llama, tiny_opt


def build():
    return tiny_llama(seed=0, layers=2)


def opt():
    return tiny_opt(seed=0, layers=1)


# The embedding gets its own (rotated) table; lm_head keeps `lm_head.weight` (norm fused, rotated).
# Only constants change: no op is added.
# CHECK-LABEL: // stage: aten
# CHECK:       %[[EMB:[a-z0-9_]+]] = const "model.embed_tokens.weight" : f32[128, 64]
# CHECK-NEXT:  %[[HEAD:[a-z0-9_]+]] = const "lm_head.weight" : f32[128, 64]
# CHECK-NOT:   slimc.
# CHECK:       aten.embedding(%[[EMB]], %input_ids)
# CHECK:       aten.linear(%{{[a-z0-9_]+}}, %[[HEAD]], none) {{.*}} loc("lm_head")
# CHECK-NEXT:  return
#
# CHECK-LABEL: Pass statistics report
# CHECK:       quarot
# CHECK-NEXT:    (5) fused norms
# CHECK-NOT:     online rotations
# CHECK:         (2) rotated attention heads (v/o pairs)
# CHECK-NEXT:    (1) rotated embeddings
# CHECK-NEXT:    (15) rotated linears
# CHECK-NEXT:    (1) untied embeddings
# CHECK-LABEL: numerics vs float model
# CHECK:       quarot {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}

# NOHEADS-LABEL: Pass statistics report
# NOHEADS:         (0) rotated attention heads (v/o pairs)
# NOHEADS-NEXT:    (1) rotated embeddings

# OPT (LayerNorms with biases, learned positions): the writers are mean-baked, the rotation keeps
# the all-ones direction, and every LayerNorm stays a LayerNorm (weight 1, its bias in place or
# in the readers' biases). Only constants change.
# LAYERNORM-LABEL: // stage: aten
# LAYERNORM-NOT:   slimc.
# LAYERNORM:       aten.layer_norm({{.*}}_layer_norm_weight, {{.*}}_layer_norm_bias, normalized_shape=[64]{{.*}} loc("model.decoder.layers.0.self_attn_layer_norm")
# LAYERNORM:       aten.layer_norm({{.*}} loc("model.decoder.final_layer_norm")
# LAYERNORM-LABEL: Pass statistics report
# LAYERNORM:       quarot
# LAYERNORM-NEXT:    (3) fused norms
# LAYERNORM-NEXT:    (6) mean-baked weights
# LAYERNORM-NEXT:    (3) mean-subtracting norms (LayerNorm)
# LAYERNORM-NEXT:    (1) norm biases rotated in place
# LAYERNORM-NEXT:    (1) rotated attention heads (v/o pairs)
# LAYERNORM-NEXT:    (2) rotated embeddings
# LAYERNORM-NEXT:    (7) rotated linears
# LAYERNORM-LABEL: numerics vs float model
# LAYERNORM:       quarot {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}
