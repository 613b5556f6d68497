"""oneDNN's int8 linear (`torch.ops.onednn.qlinear_pointwise`) as an engine of the CPU int8 ops."""

from __future__ import annotations

import functools
import os
import weakref

import torch
from torch import Tensor

from slimc.ops.int8_products import exact_int8_hardware

ENGINES = ("onednn", "int_mm")
"""Engines of the int8 x int8 product: oneDNN's prepacked int8 linear, or `torch._int_mm` (on CPUs
without VNNI / AMX, exact float32 products over K chunks from 8 rows on: `slimc.ops.int8_products`)."""

_PACKED: dict[int, tuple[weakref.ref[Tensor], Tensor]] = {}
"""id(int8 weight) -> (a weak reference to it, oneDNN's prepacked copy)."""


def available() -> bool:
    """Whether oneDNN's int8 linear is here and exact: this torch has it (x86 and Arm builds with
    oneDNN do) and the CPU has VNNI or AMX; SLIMC_CPU_ONEDNN=0 turns it off.

    Without VNNI (AVX2-only x86, e.g. an AMD EPYC before Zen 4), oneDNN's u8 x s8 kernel adds
    pairs of products in int16 with saturation (`vpmaddubsw`), so full-range int8 activations
    give wrong sums (off by up to 6 in the logits of a random test): `torch._int_mm` runs there.
    """
    if os.environ.get("SLIMC_CPU_ONEDNN", "1") == "0":
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")):
        return False
    return exact_int8_products()


exact_int8_products = exact_int8_hardware
"""Whether the CPU's int8 products are exact in hardware (VNNI / AMX); see slimc.ops.int8_products."""


MIN_WEIGHT_ELEMENTS = 1 << 22
"""Weights from this size (N x K) on get oneDNN under `int8-engine=auto`. Whole-op times on an
AMX Xeon (2 cores), oneDNN / torch._int_mm in us: 5632 x 2048 at 1 / 128 / 512 rows 430 / 529,
1279 / 1538, 3692 / 5100; 2048 x 2048 221 / 224, 685 / 760; at 1024 x 2048 and below
torch._int_mm is as fast or faster (576 x 576, one row: 86 / 64)."""


def default_engine(n: int, k: int) -> str:
    """The engine `int8-engine=auto` binds for an int8 weight [n, k]: oneDNN where this torch
    has it and the weight has at least `MIN_WEIGHT_ELEMENTS` elements, else `torch._int_mm`."""
    return "onednn" if available() and n * k >= MIN_WEIGHT_ELEMENTS else "int_mm"


def packed_weight(qweight: Tensor) -> Tensor:
    """oneDNN's prepacked copy of int8 `qweight` [N, K], made on first use and kept while
    `qweight` lives (an opaque tensor: it cannot be saved, so the model keeps `qweight`)."""
    key = id(qweight)
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is qweight:
        return entry[1]
    packed = torch.ops.onednn.qlinear_prepack(qweight, None)
    _PACKED[key] = (weakref.ref(qweight, lambda _ref, key=key: _PACKED.pop(key, None)), packed)
    return packed


MIN_OUTPUTS = 512
"""Products with fewer outputs (rows x N) go to `torch._int_mm`: below 320, oneDNN took a slow
path on an AMX Xeon (N=192 at one row: 1.3 ms against 35 us for N=576)."""


def matmul(xq: Tensor, qweight: Tensor) -> Tensor:
    """fp32 [M, N] = float(xq [M, K] @ qweight [N, K]^T), int32 accumulation; unit scales, so
    the caller's epilogue rounds exactly as it does after `torch._int_mm`."""
    n = qweight.shape[0]
    return torch.ops.onednn.qlinear_pointwise.tensor(
        xq,
        torch.ones((), dtype=torch.float32),
        torch.zeros((), dtype=torch.int64),
        packed_weight(qweight),
        _unit_scales(n),
        _zero_points(n),
        None,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


@functools.lru_cache(maxsize=64)
def _unit_scales(n: int) -> Tensor:
    return torch.ones(n, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _zero_points(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.int64)
