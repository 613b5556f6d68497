"""Compile the 8-bit kernels ahead of time for a CUDA architecture, without a GPU.

`compile_family("w8a8" | "fp8" | "hadamard_quant", arch=90)` runs Triton's whole compiler
(down to a cubin with the bundled ptxas) on representative specializations of the family's
kernels. It catches what the CPU interpreter cannot (constexpr rules, layouts, tensor-core
operand types), so tests run it on machines without a GPU. Needs TRITON_INTERPRET unset when
the kernels are first imported (tests use a subprocess).
"""

from __future__ import annotations

from typing import Any

__all__ = ["compile_family", "specs"]

_MM_SIG = ("a_ptr", "a_scale_ptr", "a_zp_ptr", "b_ptr", "b_scale_ptr", "bias_ptr", "out_ptr",
           "M", "N", "K", "stride_am", "stride_ak", "stride_bn", "stride_bk", "stride_om",
           "stride_on", "qmin", "qmax")  # fmt: skip


def _mm(a: str, b: str, out: str, a_mode: int, fp8: bool, zp: bool, split: int, tile: tuple):
    types = (a, "*fp32", "*i32", b, "*fp32", "*bf16", out if split == 1 else "*fp32",
             *["i32"] * 9, "fp32", "fp32")  # fmt: skip
    consts = {"A_MODE": a_mode, "A_SCALE_PER_ROW": a_mode == 0, "HAS_ZP": zp, "HAS_BIAS": True,
              "FP8": fp8, "USE_RINT": True, "OUT_ROUND": 1, "BLOCK_M": tile[0],
              "BLOCK_N": tile[1], "BLOCK_K": tile[2], "SPLIT_K": split, "GROUP_M": 8}  # fmt: skip
    return "scaled_mm_kernel", dict(zip(_MM_SIG, types, strict=True)), consts


def _quant(fp8: bool):
    names = ("x_ptr", "q_ptr", "s_ptr", "M", "K", "stride_xm", "stride_xk", "stride_qm",
             "stride_qk", "qmin", "qmax")  # fmt: skip
    types = ("*bf16", "*fp8e4nv" if fp8 else "*i8", "*fp32", *["i32"] * 6, "fp32", "fp32")
    consts = {"FP8": fp8, "USE_RINT": True, "BLOCK_M": 1, "BLOCK_K": 2048}
    return "quant_per_token_kernel", dict(zip(names, types, strict=True)), consts


def _hadamard(mf: int, p2: int, use_dot: bool, x: str, precision: str):
    names = ("x_ptr", "at_ptr", "sign_ptr", "q_ptr", "s_ptr", "M", "stride_xm", "stride_qm",
             "inv_sqrt_n", "qmin", "qmax")  # fmt: skip
    at = x if precision == "native" else "*fp32"
    types = (x, at, "*fp64", "*i8", "*fp32", "i32", "i32", "i32", "fp32", "fp32", "fp32")
    mp = 1 << max(0, (mf - 1).bit_length())
    consts = {"MF": mf, "MP": mp, "KC": 16, "P2": p2, "LOG_P2": p2.bit_length() - 1,
              "USE_DOT": use_dot, "DOT_PRECISION": precision, "ROUND_ID": 1 if x == "*bf16" else 0,
              "USE_RINT": True, "BLOCK_M": 1}  # fmt: skip
    return "hadamard_quant_kernel", dict(zip(names, types, strict=True)), consts


def specs(family: str) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(kernel function name, signature, constexprs) of the representative specializations."""
    if family == "w8a8":
        return [
            _quant(False),
            _mm("*i8", "*i8", "*bf16", 0, False, True, 1, (64, 128, 128)),
            _mm("*bf16", "*i8", "*bf16", 1, False, False, 2, (16, 64, 256)),
            _mm("*fp16", "*i8", "*fp16", 2, False, True, 1, (128, 128, 128)),
        ]
    if family == "fp8":
        return [
            _quant(True),
            _mm("*fp8e4nv", "*fp8e4nv", "*bf16", 0, True, False, 1, (128, 128, 128)),
            _mm("*bf16", "*fp8e4nv", "*bf16", 1, True, False, 4, (16, 64, 128)),
        ]
    if family == "hadamard_quant":
        return [
            _hadamard(1, 4096, False, "*bf16", "native"),
            _hadamard(44, 128, True, "*bf16", "native"),
            _hadamard(12, 128, False, "*fp32", "tf32x3"),
            _hadamard(28, 512, True, "*fp32", "tf32x3"),
        ]
    raise ValueError(f"unknown kernel family {family!r}; expected w8a8, fp8 or hadamard_quant")


def compile_family(family: str, arch: int = 90) -> list[str]:
    """Compile every spec of `family` for sm_`arch`; returns one line per kernel. Raises the
    first compilation error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if family == "hadamard_quant":
        from slimc.kernels.hadamard_quant import triton_kernels as module
    else:
        from slimc.kernels.w8a8 import triton_kernels as module
    fns = {"scaled_mm_kernel", "quant_per_token_kernel", "hadamard_quant_kernel"}
    target = GPUTarget("cuda", arch, 32)
    lines = []
    for name, signature, consts in specs(family):
        assert name in fns
        fn = getattr(module, name)
        full = {**signature, **{key: "constexpr" for key in consts}}
        src = ASTSource(fn=fn, signature=full, constexprs=consts)
        kernel = triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3})
        lines.append(f"{name} sm_{arch} shared={kernel.metadata.shared}")
    return lines
