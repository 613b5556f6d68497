"""Shared plumbing for slimc's command-line tools: logging setup and one-line error reporting."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from slimc.errors import UserError
from slimc.pass_base import PassFailure


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("slimc").setLevel(logging.INFO)
    for noisy in ("transformers", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run_guarded(prog: str, body: Callable[[], int], debug: bool) -> int:
    """Run a CLI body; user-facing errors become one line on stderr and exit code 1."""
    try:
        return body()
    except (UserError, PassFailure) as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()
        print(f"{prog}: error: {' '.join(line.strip() for line in first)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
