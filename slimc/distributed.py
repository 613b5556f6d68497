"""Calibration across processes: ranks split the samples and all-reduce what they observe.

`torchrun --nproc-per-node N -m slimc.tools.cli quant ...` starts N ranks that each load the
model and take every N-th calibration sample. Each statistic a pass gathers (a Hessian, an
observer's range or histogram, per-channel activation statistics) is reduced over the ranks
before it is used, so every rank rounds the same weights from the statistics of all samples and
rank 0 writes the checkpoint. Only `torch.distributed` collectives are used: gloo for CPU
tensors, nccl / hccl where those devices are present.

Outside a process group every function here is a no-op on one rank, so the passes call them
unconditionally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from slimc.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


class RankLost(UserError):
    """A collective failed: another rank stopped, crashed or did not arrive within the timeout."""


def active() -> bool:
    """Whether this process is one of several ranks of an initialized process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many ranks calibrate together (1 outside a process group)."""
    return dist.get_world_size() if active() else 1


def backend() -> str:
    """The backend per device type: gloo for CPU tensors, plus nccl / hccl where present."""
    backends = ["cpu:gloo"]
    if torch.cuda.is_available():
        backends.append("cuda:nccl")
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        backends.append("npu:hccl")
    return ",".join(backends)


def init_from_environment(timeout_s: float) -> bool:
    """Join the process group the launcher describes (`torchrun` sets `WORLD_SIZE`, `RANK`,
    `MASTER_ADDR`, `MASTER_PORT`); False, and nothing done, when `WORLD_SIZE` is unset or 1.
    A rank waits `timeout_s` seconds in a reduction for the others before it gives up.

    Raises:
        UserError: `timeout_s` is not positive, or the group cannot be formed.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or active():
        return active()
    if timeout_s <= 0:
        raise UserError(f"the distributed timeout must be positive, got {timeout_s}")
    try:
        dist.init_process_group(backend=backend(), timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"cannot join the process group of {size} ranks: {exc}") from exc
    log.info("rank %d of %d joined the process group (%s)", rank(), size, backend())
    return True


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(samples: Sequence[T]) -> list[T]:
    """This rank's calibration samples: every `world_size()`-th, starting at `rank()`.

    Raises:
        UserError: fewer samples than ranks (a rank would observe nothing).
    """
    size = world_size()
    if size == 1:
        return list(samples)
    if len(samples) < size:
        raise UserError(
            f"{len(samples)} calibration samples cannot be split across {size} ranks: give at "
            f"least one sample per rank"
        )
    return list(samples[rank() :: size])


def _collective(what: str, run: Any) -> None:
    """Run one collective; a failure (a rank gone, a timeout) becomes `RankLost`."""
    try:
        run()
    except (RuntimeError, dist.DistError) as exc:
        raise RankLost(
            f"rank {rank()} of {world_size()}: {what} across ranks failed; another rank "
            f"stopped or did not arrive in time ({exc})"
        ) from exc


def _identical(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, what: str) -> torch.Tensor:
    """`tensor` reduced with `op` over all ranks, bit-identical on every rank: reduced to rank 0
    and broadcast from it (an all-reduce may round differently per rank)."""
    if not active():
        return tensor
    out = tensor.detach().clone().contiguous()
    _collective(what, lambda: dist.reduce(out, dst=0, op=op))
    _collective(what, lambda: dist.broadcast(out, src=0))
    return out


def reduce_sum(tensor: torch.Tensor, what: str = "a sum") -> torch.Tensor:
    """The sum of `tensor` over ranks (a new tensor; `tensor` itself on one rank)."""
    return _identical(tensor, dist.ReduceOp.SUM, what)


def reduce_min(tensor: torch.Tensor, what: str = "a minimum") -> torch.Tensor:
    """The elementwise minimum of `tensor` over ranks."""
    return _identical(tensor, dist.ReduceOp.MIN, what)


def reduce_max(tensor: torch.Tensor, what: str = "a maximum") -> torch.Tensor:
    """The elementwise maximum of `tensor` over ranks."""
    return _identical(tensor, dist.ReduceOp.MAX, what)


def reduce_count(count: int, what: str = "a count") -> int:
    """The sum of an integer count over ranks."""
    if not active():
        return count
    return int(reduce_sum(torch.tensor(count, dtype=torch.int64), what))
