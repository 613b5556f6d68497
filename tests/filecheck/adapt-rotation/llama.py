# RUN: slimc-opt %s -p adapt-rotation --pass-statistics --track-error 2>&1 | filecheck %s
# RUN: slimc-opt %s -p "adapt-rotation{layer-type=q_proj,up_proj max-samples=100 steps=3 quant-bits=8}" --pass-statistics 2>&1 | filecheck %s --check-prefix=OPTIONS
# RUN: not slimc-opt %s -p "adapt-rotation{layer-type=down_proj}" 2>&1 | filecheck %s --check-prefix=NOMATCH
# RUN: not slimc-opt %s -p "adapt-rotation{online=true}" 2>&1 | filecheck %s --check-prefix=ONLINE
# RUN: not slimc-opt %s:gemma2 -p adapt-rotation 2>&1 | filecheck %s --check-prefix=GEMMA2
"""adapt-rotation on Llama: QuaRot's folding with a learned Q R; exact; the int4 error it lowers."""

import torch

from tests.models import tiny_gemma2, tiny_llama


def calib():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (1, 32), generator=gen) for _ in range(4)]


def build():
    return tiny_llama(seed=0, layers=2), None, calib()


def gemma2():
    return tiny_gemma2(seed=0, layers=2), None, calib()


# As quarot: only constants change (the embedding gets its own table, lm_head keeps its name).
# CHECK-LABEL: // stage: aten
# CHECK:       %[[EMB:[a-z0-9_]+]] = const "model.embed_tokens.weight" : f32[128, 64]
# CHECK-NEXT:  %[[HEAD:[a-z0-9_]+]] = const "lm_head.weight" : f32[128, 64]
# CHECK-NOT:   slimc.
# CHECK:       aten.embedding(%[[EMB]], %input_ids)
# CHECK:       aten.linear(%{{[a-z0-9_]+}}, %[[HEAD]], none) {{.*}} loc("lm_head")
# CHECK-NEXT:  return
#
# The up_proj inputs of both layers (4 samples x 32 tokens each) are fitted; the learned rotation
# lowers their int4 per-token error below the Hadamard's.
# CHECK-LABEL: Pass statistics report
# CHECK:       adapt-rotation
# CHECK-NEXT:    (256) fitted input rows
# CHECK-NEXT:    (2) fitted linears
# CHECK-NEXT:    (5) fused norms
# CHECK-NEXT:    ({{[0-9]+}}) learning steps taken
# CHECK-NEXT:    ({{[0-9.e-]+}}) quant error after (X Q R, learned)
# CHECK-NEXT:    ({{[0-9.e-]+}}) quant error before (X Q, Hadamard)
# CHECK-NEXT:    ({{[1-9][0-9]*\.[0-9]+}}) quant error reduction (%)
# CHECK-NEXT:    ({{[0-9.e-]+}}) quant error unrotated (X)
# CHECK-NEXT:    (2) rotated attention heads (v/o pairs)
# CHECK-NEXT:    (1) rotated embeddings
# CHECK-NEXT:    (15) rotated linears
# CHECK-NEXT:    (1) untied embeddings
# CHECK-LABEL: numerics vs float model
# CHECK:       adapt-rotation {{ +}}{{[1-9][0-9][0-9]\.[0-9][0-9]}}

# Two linear inputs per layer (q_proj's and up_proj's), 100 rows spread over them; 3 steps at most.
# OPTIONS-LABEL: Pass statistics report
# OPTIONS:         (100) fitted input rows
# OPTIONS-NEXT:    (4) fitted linears
# OPTIONS-NEXT:    (5) fused norms
# OPTIONS-NEXT:    ({{[0-3]}}) learning steps taken

# NOMATCH: slimc-opt: error: adapt-rotation: no linear reading the residual stream matches layer-type=down_proj

# ONLINE: slimc-opt: error: pass 'adapt-rotation': online=true is not supported (quarot rotates such values)

# GEMMA2: slimc-opt: error: adapt-rotation: type_as_1 (model.layers.0.post_attention_layernorm) is added to the residual stream at add_12, {{.*}} (quarot rotates it at run time; a learned rotation is not a Hadamard)
