"""Kernel family npu: Ascend NPU kernel ops (torch_npu, or an emulation of it) for `lower-npu`.

Importing this package registers the `slimc::npu_linear_*` ops; torch_npu itself is imported
only when an op runs on an NPU tensor.
"""

from __future__ import annotations

from slimc.kernels.npu import emulate, layout, ops

__all__ = ["emulate", "layout", "ops"]
