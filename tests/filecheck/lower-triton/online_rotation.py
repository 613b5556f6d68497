# RUN: slimc-opt %s -p "quarot{online-inputs=down_proj},w8a8-dynamic,lower-triton{device=default}" | filecheck %s
"""lower-triton after an online rotation: the Hadamard joins the quantization and the GEMM."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=1)


# The run-time Hadamard of down_proj's input and its per-token quantization are gone: one
# kernel op takes the unrotated activation and the signs.
# CHECK-LABEL: // stage: kernel
# CHECK-NOT:   slimc.hadamard(
# CHECK:       slimc.triton_linear_w8a8_hadamard([[X:%[a-z_0-9]+]], %model_layers_0_mlp_down_proj_input_rotation_signs, {{.*}}, qmin=-128, qmax=127, rotate_kernel="hadamard_quant.auto", rotate_config=[], kernel="w8a8.auto", config=[], out_dtype=f32) : f32[{{.*}}, 64]  {kernel = "triton.hadamard_quant.auto+w8a8.auto"}  loc("model.layers.0.mlp.down_proj")
# CHECK-NOT:   slimc.hadamard(
# CHECK-NOT:   slimc.quantize_per_token
