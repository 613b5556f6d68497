"""Measure W4A16 kernel configs on the local GPU and build a config table (configs/*.json form)."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch

from slimc.kernels.w4a16 import dispatch as dsp
from slimc.kernels.w4a16 import launcher
from slimc.ops.packing import pack_int4

logger = logging.getLogger(__name__)

__all__ = ["random_problem", "tune_table"]


def random_problem(
    n: int, k: int, m: int, group_size: int, dtype: torch.dtype, device: str | torch.device
) -> tuple[torch.Tensor, ...]:
    """Random (x, qweight, scale, zero_point) for benchmarks: asymmetric int4, float32 scales."""
    groups = 1 if group_size == -1 else k // group_size
    x = torch.randn(m, k, device=device, dtype=dtype)
    q = torch.randint(-8, 8, (n, k), device=device, dtype=torch.int8)
    scale = torch.rand(n, groups, device=device) * 0.02 + 0.001
    zp = torch.randint(-4, 5, (n, groups), device=device, dtype=torch.int8)
    return x, pack_int4(q), scale, zp


def tune_table(
    shapes: list[tuple[int, int]],
    ms: list[int],
    group_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    match: list[str] | None = None,
) -> dict[str, Any]:
    """A measured table for this GPU: the fastest candidate per (N, K) and M bucket.

    The generic rules are copied from the table currently matching the device, so shapes that
    were not tuned keep behaving as before. Needs a CUDA GPU.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("tune_table needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    current = dsp.load_table(name)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table: dict[str, Any] = {
        "tuned": True,
        "status": (
            f"measured on {name}, do_bench median, group_size={group_size}, {dtype}, "
            f"{datetime.date.today().isoformat()}"
        ),
        "match": match or list(current.match) or [name.lower()],
        "sms": sms,
        "rules": {
            str(b): {"kernel": e["kernel"], "config": e["config"]}
            for b, e in sorted(current.rules.items())
        },
        "shapes": {},
    }
    for n, k in shapes:
        entries: dict[str, Any] = {}
        for m in ms:
            x, qw, scale, zp = random_problem(n, k, m, group_size, dtype, "cuda")
            p = launcher.prepare(x, qw, scale, zp, group_size, None)
            timed = launcher.benchmark(p, launcher.candidates(n, k, m, group_size, sms))
            if not timed:
                logger.warning("w4a16 tune: no candidate ran for N=%d K=%d M=%d", n, k, m)
                continue
            best_ms, kernel, cfg = timed[0]
            logger.info(
                "w4a16 tune N=%d K=%d M=%d: %s %s %.1f us", n, k, m, kernel, cfg, best_ms * 1e3
            )
            entries[str(dsp.bucket_m(m))] = {"kernel": kernel, "config": cfg}
        table["shapes"][f"{n},{k}"] = entries
    dsp.parse_table("tuned", table)  # what we write must load
    return table
