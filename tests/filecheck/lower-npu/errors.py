# RUN: not slimc-opt %s -p "lower-npu" 2>&1 | filecheck %s --check-prefix=STAGE
# RUN: slimc-opt %s -p "w8a16,lower-npu" --pass-statistics --no-loc 2>&1 | filecheck %s --check-prefix=STATS
"""lower-npu runs on fused programs only; statistics count the lowered linears."""

from tests.models import tiny_mlp


def build():
    model = tiny_mlp(seed=0)
    return model, model.example_inputs()


# STAGE:     slimc-opt: error: pass 'lower-npu' (position 1) runs on the fused stage, but the program is at the aten stage there
# STAGE-NOT: Traceback

# STATS-LABEL: // stage: kernel
# STATS:       slimc.npu_linear_w8a16(
# STATS:       Pass statistics report
# STATS:       lower-npu
# STATS-NEXT:  (2) lowered linears
