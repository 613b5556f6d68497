"""Every calibration statistic reduced over two ranks, for tests/test_distributed.py.

Run as `torchrun --standalone --nproc-per-node 2 tests/distributed_reductions.py OUT`: each rank
observes its half of `batches()` and all-reduces; rank 0 saves what it ends with to OUT.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from slimc import distributed
from slimc.analyses.activation_stats import ChannelStats
from slimc.quant.expert_inputs import ExpertInputs
from slimc.quant.hessian import HessianAccumulator
from slimc.quant.observers import HistogramObserver, MinMaxObserver
from slimc.quant.scheme import TensorQuantSpec

K, EXPERTS = 16, 4


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four (input [6, K], expert ids [6]) batches; expert 3 is routed only in the odd ones
    (rank 1's with two ranks), expert 2 never; the ranges differ per batch."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(4):
        x = torch.randn(6, K, generator=gen) * (1 + i) + i
        ids = torch.tensor([0, 1, 0, 1, 3, 3] if i % 2 else [0, 1, 0, 1, 0, 1])
        out.append((x, ids))
    return out


def observe(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Each statistic fed `parts` (then all-reduced, a no-op in one process)."""
    tensor = TensorQuantSpec(granularity="tensor", symmetric=False)
    stats: dict[str, Any] = {
        "minmax": MinMaxObserver(tensor),
        "minmax_channel": MinMaxObserver(TensorQuantSpec(granularity="channel")),
        "minmax_mean": MinMaxObserver(tensor, aggregation="mean"),
        "histogram": HistogramObserver(tensor),
        "hessian": HessianAccumulator(K),
        "experts": ExpertInputs(EXPERTS, lambda: HessianAccumulator(K)),
        "channels": ChannelStats.empty(K),
    }
    for x, ids in parts:
        for name, stat in stats.items():
            stat.update(x, ids) if name == "experts" else stat.update(x)
    for stat in stats.values():
        stat.all_reduce()
    result: dict[str, Any] = {}
    for name in ("minmax", "minmax_channel", "minmax_mean"):
        result[name] = (stats[name].min_val, stats[name].max_val)
    hist = stats["histogram"]
    result["histogram"] = (hist.min_val, hist.max_val, hist.histogram, hist.clip_range())
    result["hessian"] = (stats["hessian"].hessian, stats["hessian"].rows)
    experts = stats["experts"]
    result["experts"] = (
        experts.rows,
        {e: experts.of(e).hessian for e in range(EXPERTS) if experts.of(e) is not None},
    )
    ch = stats["channels"]
    result["channels"] = (
        ch.absmax,
        ch.absmean,
        ch.min,
        ch.max,
        ch.tokens,
        ch.token_absmax_mean,
        ch.token_absmax_max,
    )
    return result


if __name__ == "__main__":
    distributed.init_from_environment(timeout_s=60)
    try:
        mine = distributed.shard(batches())
        result = observe(mine)
        result["shard"] = [float(x[0, 0]) for x, _ in mine]
        if distributed.rank() == 0:
            torch.save(result, sys.argv[1])
    finally:
        distributed.shutdown()
