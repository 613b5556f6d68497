"""Hadamard matrices: orthogonality of every construction, clear errors, seeded signs, the op."""

from __future__ import annotations

import math

import pytest
import torch

import slimc.ops  # noqa: F401  (registers slimc::hadamard)
from slimc.rotate.hadamard import (
    KRON_FACTOR_MAX,
    apply,
    construction,
    hadamard,
    jacobsthal,
    kron_factors,
    paley1,
    paley2,
    prime_power,
    random_hadamard,
    random_signs,
)

SIZES = [1, 2, 4, 12, 20, 28, 36, 40, 44, 52, 60, 64, 100, 108, 140, 576, 640, 1536, 5632]


def assert_hadamard(h: torch.Tensor) -> None:
    n = h.shape[0]
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert bool((h.abs() == 1).all())
    # H H^T = n I, on a sample of rows for the big orders (a full product takes too long here)
    rows = torch.arange(n) if n <= 1536 else torch.randperm(n, generator=torch.Generator())[:48]
    gram = h[rows] @ h.T
    want = torch.zeros_like(gram)
    want[torch.arange(len(rows)), rows] = n
    assert torch.equal(gram, want)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_hadamard(n: int) -> None:
    assert_hadamard(hadamard(n))


@pytest.mark.parametrize("n", [12, 36, 52, 576, 640])
def test_random_hadamard_is_orthogonal(n: int) -> None:
    q = random_hadamard(n)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_constructions_cover_the_model_sizes() -> None:
    want = {
        12: ["paley1(11)"],
        20: ["paley1(19)"],
        28: ["paley1(27)"],  # GF(27): a prime power field
        36: ["paley2(17)"],
        52: ["paley2(25)"],  # GF(25)
        576: ["paley2(17)", "sylvester(16)"],
        640: ["paley1(19)", "sylvester(32)"],
        1536: ["paley1(11)", "sylvester(128)"],
        5632: ["paley1(43)", "sylvester(128)"],
        4096: ["sylvester(4096)"],
    }
    for n, factors in want.items():
        assert [str(f) for f in construction(n)] == factors, n


def test_paley_blocks_and_fields() -> None:
    assert prime_power(27) == (3, 3) and prime_power(25) == (5, 2) and prime_power(12) is None
    q = jacobsthal(27)
    assert torch.equal(q, -q.T)  # skew-symmetric for q = 3 mod 4
    assert torch.equal(jacobsthal(25), jacobsthal(25).T)  # symmetric for q = 1 mod 4
    assert_hadamard(paley1(27))
    assert_hadamard(paley2(25))
    with pytest.raises(ValueError, match="3 mod 4"):
        paley1(13)


@pytest.mark.parametrize(("n", "tried"), [(188, "47 \\* 2\\^2"), (94, "multiple of 4"), (6, "")])
def test_no_construction_is_a_clear_error(n: int, tried: str) -> None:
    with pytest.raises(ValueError, match=f"no Hadamard matrix construction for n = {n}.*{tried}"):
        hadamard(n)


def test_seed_changes_signs_deterministically() -> None:
    a, b, c = random_hadamard(64, 1234), random_hadamard(64, 1234), random_hadamard(64, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # only the column signs differ: the same H with other signs
    ratio = (a / c)[0]
    assert bool((ratio.abs() == 1).all()) and torch.equal(a / ratio, c)
    assert torch.equal(a * math.sqrt(64), hadamard(64) * random_signs(64, 1234))


def test_hadamard_op_matches_random_hadamard() -> None:
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    signs = random_signs(12, 3).float()
    want = (x.double() @ random_hadamard(12, 3)).float()
    torch.testing.assert_close(torch.ops.slimc.hadamard(x, signs), want)
    torch.library.opcheck(torch.ops.slimc.hadamard, (x, signs))
    with pytest.raises(ValueError, match="signs must have shape"):
        torch.ops.slimc.hadamard(x, signs[:4])


@pytest.mark.parametrize("n", [1, 2, 12, 64, 256, 576, 640, 1536, 4096, 5632])
def test_factored_product_is_the_dense_product(n: int) -> None:
    mats = kron_factors(n)
    assert all(m.shape[0] <= max(KRON_FACTOR_MAX, 64) for m in mats)
    assert math.prod(m.shape[0] for m in mats) == n
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    dense = x @ hadamard(n)
    torch.testing.assert_close(apply(x), dense, rtol=1e-12, atol=1e-9 * math.sqrt(n))
    torch.testing.assert_close(apply(x.float()), dense.float(), rtol=1e-5, atol=1e-4)


def test_hadamard_op_on_a_large_order_matches_the_dense_rotation() -> None:
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(1)).bfloat16()
    signs = random_signs(1536, 5)
    want = (x.double() @ random_hadamard(1536, 5)).bfloat16()
    assert torch.equal(torch.ops.slimc.hadamard(x, signs), want)
