# RUN: slimc-opt --print-pipeline -p w8a8 | filecheck %s --check-prefix=W8A8
# RUN: slimc-opt --print-pipeline -p w8a8-dynamic | filecheck %s --check-prefix=DYN
# RUN: slimc-opt --print-pipeline -p "w4a16{group-size=128}" | filecheck %s --check-prefix=W4A16
# RUN: slimc-opt --print-pipeline -p "w8a16{symmetric=false},canonicalize" | filecheck %s --check-prefix=W8A16
# RUN: slimc-opt --print-pipeline -p w4a8 | filecheck %s --check-prefix=W4A8
"""Named pipelines expand to linear-quant{scheme=X},fuse-quantized-linear with options forwarded."""

# W8A8:      linear-quant{scheme=w8a8 group-size=-1 symmetric=none observer=histogram ignore=lm_head only="" on-bad-group=fallback sensitive-fraction=0.0 sensitive-modules=*mlp* sensitive-probe=w4a4 calibrate-all-experts=false},fuse-quantized-linear{{$}}
# DYN:       linear-quant{scheme=w8a8-dynamic {{.*}}},fuse-quantized-linear{{$}}
# W4A16:     linear-quant{scheme=w4a16 group-size=128 {{.*}}},fuse-quantized-linear{{$}}
# W8A16:     linear-quant{scheme=w8a16 group-size=-1 symmetric=false {{.*}}},fuse-quantized-linear,canonicalize{{$}}
# W4A8:      linear-quant{scheme=w4a8 {{.*}}},fuse-quantized-linear{{$}}
