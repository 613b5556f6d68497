"""int8 x int8 -> int32 products: every path gives the exact integer sums."""

from __future__ import annotations

import pytest
import torch

from slimc.ops import int8_products


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.int64) @ b.to(torch.int64).t()).to(torch.int32)


@pytest.mark.parametrize("k", [1, 7, 1024, 1025, 3000])
def test_float_path_is_exact_over_chunks(k: int):
    gen = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (9, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=gen)
    assert torch.equal(int8_products.float_int8_matmul(a, b), _exact(a, b))


@pytest.mark.parametrize("k", [1024, 2048, 2049])
def test_float_path_is_exact_at_the_largest_sums(k: int):
    """All -128: each chunk sums to 1024 * 2^14 = 2^24, the edge of float32's exact integers."""
    a = torch.full((8, k), -128, dtype=torch.int8)
    b = torch.cat([torch.full((1, k), -128, dtype=torch.int8), torch.full((1, k), 127, dtype=torch.int8)])
    out = int8_products.float_int8_matmul(a, b)
    assert torch.equal(out, _exact(a, b))
    assert out[0, 0].item() == k * 16384


def test_float_path_falls_back_to_float64_when_float32_matmuls_are_reduced(monkeypatch):
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    a = torch.full((8, 4096), -128, dtype=torch.int8)
    b = torch.full((3, 4096), 127, dtype=torch.int8)
    assert torch.equal(int8_products.float_int8_matmul(a, b), _exact(a, b))


@pytest.mark.parametrize("vnni", [True, False])
@pytest.mark.parametrize("rows", [0, 1, 7, 8, 64])
def test_int8_matmul_is_exact_with_and_without_vnni(monkeypatch, vnni: bool, rows: int):
    monkeypatch.setattr(int8_products, "exact_int8_hardware", lambda: vnni)
    gen = torch.Generator().manual_seed(rows)
    a = torch.randint(-128, 128, (rows, 1500), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (33, 1500), dtype=torch.int8, generator=gen)
    assert int8_products.use_float_path(rows, a.device) == (not vnni and rows >= 8)
    assert torch.equal(int8_products.int8_matmul(a, b), _exact(a, b))
