"""A `slimc quant` rank that fails on purpose, for the distributed tests (run under torchrun).

`SLIMC_FAULT=die` makes rank `SLIMC_FAULT_RANK` exit at its `SLIMC_FAULT_AT`-th Hessian or
observer reduction; `SLIMC_FAULT=hang` makes it stop there and wait forever.
"""

from __future__ import annotations

import os
import sys
import time

from slimc import distributed
from slimc.tools.cli import main

_calls = 0
_reduce_sum = distributed.reduce_sum


def _failing_reduce_sum(tensor, what="a sum"):  # type: ignore[no-untyped-def]
    global _calls
    _calls += 1
    if distributed.rank() == int(os.environ["SLIMC_FAULT_RANK"]) and _calls == int(
        os.environ["SLIMC_FAULT_AT"]
    ):
        if os.environ["SLIMC_FAULT"] == "die":
            os._exit(3)
        while True:
            time.sleep(60)
    return _reduce_sum(tensor, what)


distributed.reduce_sum = _failing_reduce_sum

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
