"""The CLIs' heap setting: freed large tensors go back to the OS even between live small ones."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
import torch
from slimc.heap import return_freed_memory_to_os

def rss_mb():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024

applied = return_freed_memory_to_os() if sys.argv[1] == "on" else False
warm = torch.ones(2 << 20)  # one 8 MB block, freed: glibc would raise its threshold here
del warm
before = rss_mb()
big, small = [], []
for _ in range(40):  # 8 MB blocks with small survivors between them
    big.append(torch.ones(2 << 20))
    small.append(torch.ones(4 << 10))
peak = rss_mb()
del big
print(applied, before, peak, rss_mb())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_tensors_return_to_the_os_with_the_setting():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "on"], capture_output=True, text=True, check=True
    ).stdout.split()
    applied, before, peak, after = out[0] == "True", *map(int, out[1:])
    assert applied
    assert peak - before >= 250  # the 320 MB were resident
    assert after - before < 60  # and went back once freed


def test_resident_size_is_reported_and_grows_with_a_live_tensor():
    """In a fresh process: in this one, freed memory the heap kept could hold the tensor."""
    script = (
        "import torch\n"
        "from slimc.heap import resident_mb\n"
        "before = resident_mb()\n"
        "block = torch.ones(64 << 20, dtype=torch.uint8)\n"  # 64 MiB, touched
        "print(before, resident_mb())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    before, after = map(int, out)
    assert before > 0
    assert after - before >= 48
