# RUN: not slimc-opt %s -p "linear-quantt" 2>&1 | filecheck %s --check-prefix=UNKNOWN
# RUN: not slimc-opt %s -p "canonicalize,linear-quant{group-size=abc}" 2>&1 | filecheck %s --check-prefix=TYPE
# RUN: slimc-opt %s -p "w8a16" --pass-statistics --no-loc 2>&1 | filecheck %s --check-prefix=STATS
"""slimc-opt errors are one line on stderr; reports go to stderr after the final IR."""

from tests.models import tiny_mlp


def build():
    model = tiny_mlp(seed=0)
    return model, model.example_inputs()


# UNKNOWN:     slimc-opt: error: unknown pass 'linear-quantt' (did you mean 'linear-quant'?)
# UNKNOWN-NOT: Traceback

# TYPE:        slimc-opt: error: option 'group-size' of pass 'linear-quant': bad value 'abc'

# STATS-LABEL: // stage: fused
# STATS:       slimc.linear_w8a16(
# STATS:       Pass statistics report
# STATS:       linear-quant
# STATS-NEXT:  (2) quantized linears (w8a16)
# STATS:       fuse-quantized-linear
# STATS-NEXT:  (2) fused linears
