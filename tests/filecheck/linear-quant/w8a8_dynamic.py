# RUN: slimc-opt %s -p "linear-quant{scheme=w8a8-dynamic}" | filecheck %s
"""linear-quant w8a8-dynamic: per-token int8 input qparams chosen at run time, no calibration."""

from tests.models import tiny_llama


def build():
    return tiny_llama(seed=0, layers=2)


# CHECK-LABEL: // stage: qdq
# CHECK:       [[W:%[a-z_0-9]+]] = slimc.dequantize_affine({{%[a-z_0-9]+}}, {{%[a-z_0-9]+}}, none, block_size=[1, -1], qmin=-128, qmax=127, out_dtype=f32) : f32[64, 64]  loc("model.layers.0.self_attn.q_proj")
# CHECK-NEXT:  [[QP:%[a-z_0-9]+]] = slimc.choose_qparams_affine([[X:%[a-z_0-9]+]], block_size=[1, 1, -1], qmin=-128, qmax=127, symmetric=true) : (f32[{{.*}}, 1], i32[{{.*}}, 1])
# CHECK-NEXT:  [[S:%[a-z_0-9]+]] = py.getitem([[QP]], 0)
# CHECK-NEXT:  [[Z:%[a-z_0-9]+]] = py.getitem([[QP]], 1)
# CHECK-NEXT:  [[Q:%[a-z_0-9]+]] = slimc.quantize_affine([[X]], [[S]], [[Z]], block_size=[1, 1, -1], qmin=-128, qmax=127, out_dtype=i8) : i8[
# CHECK-NEXT:  [[DQ:%[a-z_0-9]+]] = slimc.dequantize_affine([[Q]], [[S]], [[Z]], block_size=[1, 1, -1], {{.*}} out_dtype=f32)
# CHECK-NEXT:  aten.linear([[DQ]], [[W]], none) {{.*}} loc("model.layers.0.self_attn.q_proj")
#
# No calibrated constants.
# CHECK-NOT:   input_scale
# CHECK:       return
