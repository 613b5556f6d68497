# RUN: slimc-opt %s -p iter-smooth --pass-statistics --track-error --print-analyses 2>&1 | filecheck %s
# RUN: slimc-opt %s -p "iter-smooth{enable-subgraph-type=ov,up-down ov-reduce=max}" --pass-statistics 2>&1 | filecheck %s --check-prefix=KINDS
# RUN: not slimc-opt %s:nocalib -p iter-smooth 2>&1 | filecheck %s --check-prefix=NOCALIB
"""iter-smooth on Llama (GQA 4/2 heads): all four group kinds, exact, structure untouched."""

import torch

from tests.models import tiny_llama


def build():
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (1, 16), generator=gen) for _ in range(2)]
    return tiny_llama(seed=0, layers=2), None, calib


def nocalib():
    return tiny_llama(seed=0, layers=2)


# Smoothing only rescales constants: the program stays float, no op is added.
# CHECK-LABEL: // stage: aten
# CHECK:       const "model.layers.0.input_layernorm.weight" : f32[64]
# CHECK-NOT:   slimc.
# CHECK:       aten.linear({{.*}} loc("lm_head")
# CHECK-NEXT:  return
#
# CHECK-LABEL: Pass statistics report
# CHECK:       iter-smooth
# CHECK-NEXT:    (4) smoothed norm-linear groups
# CHECK-NEXT:    (2) smoothed ov groups
# CHECK-NEXT:    (2) smoothed up-down groups
#
# Exact: the logits keep ~130 dB SQNR (float rounding only).
# CHECK-LABEL: numerics vs float model
# CHECK:       iter-smooth {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}
#
# The groups (the lm_head tied to the embedding is refused) and the statistics the pass updated.
# CHECK-LABEL: linear-groups: 8 groups, 1 refused
# CHECK-NEXT:    norm-linear model.layers.0.input_layernorm -> q_proj,k_proj,v_proj
# CHECK-NEXT:    ov model.layers.0.self_attn.v_proj -> o_proj  [32 -> 64 channels]
# CHECK-NEXT:    norm-linear model.layers.0.post_attention_layernorm -> gate_proj,up_proj
# CHECK-NEXT:    up-down model.layers.0.mlp.up_proj -> down_proj
# CHECK:         refused norm-linear at model.norm -> lm_head: weight lm_head.weight of lm_head is shared with aten.embedding in model.embed_tokens (tied weights)
# CHECK-NEXT:  activation-stats: 9 linear inputs
# CHECK-NEXT:    {{.*}} -> model.layers.0.self_attn.k_proj,model.layers.0.self_attn.q_proj,model.layers.0.self_attn.v_proj: absmax {{.*}}, tokens 32

# KINDS-LABEL: Pass statistics report
# KINDS:       iter-smooth
# KINDS-NEXT:    (2) smoothed ov groups
# KINDS-NEXT:    (2) smoothed up-down groups
# KINDS-NOT:     norm-linear

# NOCALIB: slimc-opt: error: the pipeline needs calibration data: make {{.*}}llama_gqa.py:nocalib() return (model, example_inputs, calib)
