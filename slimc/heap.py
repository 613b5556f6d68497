"""Process memory: glibc heap settings for long quantization runs, and the resident set size."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""glibc's `mallopt` parameter number for the mmap threshold."""

MMAP_THRESHOLD_BYTES = 1 << 20
"""Allocations from 1 MiB on get their own mapping, unmapped when freed.

glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, so after the
first few weights most tensors come from the heap, and a heap that freed tensors fragment never
shrinks: `slimc quant` w8a8-dynamic on a 0.45 GB bf16 synthetic Llama peaked at 2.64 GB with
glibc's defaults and at 1.87 GB with this fixed threshold, in about the same time. Setting the
threshold also turns off glibc's dynamic adjustment of it."""


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD_BYTES` for this process (Linux with glibc
    only; elsewhere nothing happens). A process-wide setting: the CLIs call it, `slimc.compile`
    does not (set `MALLOC_MMAP_THRESHOLD_=1048576` in the environment for the same effect).

    Returns:
        Whether the setting was applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        libc = ctypes.CDLL(path)
        applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
    if not applied:
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused")
    return applied


def resident_mb() -> int:
    """This process's resident set size in MiB (Linux; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    except (OSError, ValueError, IndexError):
        import resource  # not on Windows

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak // (1 << 20) if platform.system() == "Darwin" else peak // 1024
