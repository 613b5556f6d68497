# RUN: slimc-opt %s -p "quarot{online-inputs=down_proj},w8a8-dynamic,lower-cpu{int8-engine=onednn}" | filecheck %s
"""lower-cpu after an online rotation: the Hadamard runs inside the int8 kernel op."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=1)


# down_proj's run-time Hadamard and its per-token quantization are gone: one kernel op takes the
# unrotated activation and signs / sqrt(K) as a constant.
# CHECK-LABEL: // stage: kernel
# CHECK-NOT:   slimc.hadamard(
# CHECK:       slimc.cpu_linear_int8_dynamic_hadamard([[X:%[a-z_0-9]+]], %model_layers_0_mlp_down_proj_cpu_sign_scale, %model_layers_0_mlp_down_proj_weight_q, {{.*}}, qmin=-128, qmax=127, engine="onednn") : f32[{{.*}}, 64]  {kernel = "cpu.hadamard+onednn", {{.*}}rotation = 'fp32'}}  loc("model.layers.0.mlp.down_proj")
# CHECK-NOT:   slimc.hadamard(
# CHECK-NOT:   slimc.quantize_per_token
