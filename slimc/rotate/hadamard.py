"""Hadamard matrices of order m * 2^k (Sylvester, Paley I/II over GF(q), Kronecker products)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["HadamardFactor", "construction", "hadamard", "random_hadamard"]

DEFAULT_SEED = 1234
"""Seed of the random sign flips (msModelSlim's)."""


@dataclass(frozen=True)
class HadamardFactor:
    """One Kronecker factor of a Hadamard matrix.

    `kind` is `sylvester` (order `order`, a power of two), `paley1` (order q + 1 from GF(q),
    q = 3 mod 4) or `paley2` (order 2(q + 1) from GF(q), q = 1 mod 4).
    """

    kind: str
    order: int
    q: int = 0

    def __str__(self) -> str:
        return f"{self.kind}({self.q})" if self.q else f"{self.kind}({self.order})"


# -- finite fields GF(p^k) ------------------------------------------------------------------------
def prime_power(q: int) -> tuple[int, int] | None:
    """`(p, k)` with `q = p^k` for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """`a mod f` over GF(p); polynomials as coefficient lists, lowest degree first, f monic."""
    a = [c % p for c in a]
    while len(a) >= len(f):
        lead = a[-1]
        if lead:
            shift = len(a) - len(f)
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return a


def _monic_polys(degree: int, p: int) -> list[list[int]]:
    polys = []
    for index in range(p**degree):
        coeffs = [(index // p**i) % p for i in range(degree)]
        polys.append([*coeffs, 1])
    return polys


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic polynomial of degree k over GF(p) with no monic factor of degree <= k/2."""
    for f in _monic_polys(k, p):
        divisors = (g for d in range(1, k // 2 + 1) for g in _monic_polys(d, p))
        if all(any(_poly_mod(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _digits(q: int, p: int, k: int) -> torch.Tensor:
    """Element index -> its k base-p digits (the polynomial coefficients), [q, k]."""
    index = torch.arange(q)
    return torch.stack([(index // p**i) % p for i in range(k)], dim=1)


def quadratic_character(q: int) -> torch.Tensor:
    """chi over GF(q) indexed by element: 0 at 0, 1 on non-zero squares, -1 elsewhere (int64).

    Elements of GF(p^k) are polynomials of degree < k over GF(p) modulo a fixed irreducible
    polynomial, indexed by their base-p digits.
    """
    p, k = prime_power(q) or (0, 0)
    if not p:
        raise ValueError(f"{q} is not a prime power")
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    if k == 1:
        chi[(torch.arange(1, q) ** 2) % q] = 1
        return chi
    f = _irreducible(p, k)
    for index in range(1, q):
        a = [(index // p**i) % p for i in range(k)]
        square = [0] * (2 * k - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(a):
                square[i + j] += x * y
        r = _poly_mod(square, f, p)
        chi[sum(c * p**i for i, c in enumerate(r))] = 1
    return chi


def jacobsthal(q: int) -> torch.Tensor:
    """The q x q matrix `Q[i, j] = chi(a_j - a_i)` over GF(q) (float64)."""
    p, k = prime_power(q) or (0, 0)
    if not p:
        raise ValueError(f"{q} is not a prime power")
    digits = _digits(q, p, k)
    diff = (digits[None, :, :] - digits[:, None, :]) % p
    index = (diff * (p ** torch.arange(k))).sum(-1)
    return quadratic_character(q)[index].to(torch.float64)


# -- the constructions ----------------------------------------------------------------------------
def sylvester(order: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of a power-of-two order: H_2n = [[H, H], [H, -H]]."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {order}")
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.kron(base, h)
    return h


def paley1(q: int) -> torch.Tensor:
    """Paley's first construction, order q + 1 for a prime power q = 3 mod 4.

    With the (skew-symmetric) Jacobsthal matrix Q, `S = [[0, 1^T], [-1, Q]]` satisfies
    `S S^T = q I`, so `H = I + S` has `H H^T = (q + 1) I`.
    """
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q = 3 mod 4, got {q}")
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def paley2(q: int) -> torch.Tensor:
    """Paley's second construction, order 2(q + 1) for a prime power q = 1 mod 4.

    The symmetric conference matrix `C = [[0, 1^T], [1, Q]]` (`C C^T = q I`) becomes a Hadamard
    matrix by replacing each 0 with `[[1, -1], [-1, -1]]` and each +-1 with `+-[[1, 1], [1, -1]]`.
    """
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q = 1 mod 4, got {q}")
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = jacobsthal(q)
    ones = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zeros = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, ones) + torch.kron(torch.eye(n, dtype=torch.float64), zeros)


def _paley(order: int) -> HadamardFactor | None:
    """A Paley construction of exactly this order, if one applies."""
    q = order - 1
    if q % 4 == 3 and prime_power(q):
        return HadamardFactor("paley1", order, q)
    if order % 2 == 0:
        q = order // 2 - 1
        if q % 4 == 1 and prime_power(q):
            return HadamardFactor("paley2", order, q)
    return None


@functools.lru_cache(maxsize=256)
def _factors(n: int) -> tuple[HadamardFactor, ...] | None:
    """Kronecker factors of an order-n Hadamard matrix, or None when none is known."""
    if n >= 1 and not n & (n - 1):
        return (HadamardFactor("sylvester", n),) if n > 1 else ()
    if n % 4:
        return None  # a Hadamard matrix of order > 2 has an order divisible by 4
    twos = (n & -n).bit_length() - 1
    for k in range(twos, -1, -1):  # the smallest odd-ish core first
        m = n >> k
        paley = _paley(m)
        if paley is not None:
            return (paley, *_factors(1 << k))  # type: ignore[misc]
    for a in range(12, math.isqrt(n) + 1, 4):  # a product of two non-power-of-two orders
        if n % a == 0 and (left := _factors(a)) is not None:
            right = _factors(n // a)
            if right is not None:
                return left + right
    return None


def construction(n: int) -> tuple[HadamardFactor, ...]:
    """The Kronecker factors `hadamard(n)` uses, outermost first.

    Raises:
        ValueError: no construction is known for n (the message names n and what was tried).
    """
    factors = _factors(n) if n >= 1 else None
    if factors is None:
        tried = []
        if n >= 1 and n % 4 == 0:
            twos = (n & -n).bit_length() - 1
            tried = [f"{n >> k} * 2^{k}" for k in range(twos, -1, -1)]
        raise ValueError(
            f"no Hadamard matrix construction for n = {n}: tried n = m * 2^k with m = 1, or "
            f"m = q + 1 (prime power q = 3 mod 4), or m = 2(q + 1) (prime power q = 1 mod 4), "
            f"or a product of such orders"
            + (f" ({', '.join(tried)})" if tried else " (n must be 1, 2 or a multiple of 4)")
        )
    return factors


def _build(factor: HadamardFactor) -> torch.Tensor:
    if factor.kind == "sylvester":
        return sylvester(factor.order)
    if factor.kind == "paley1":
        return paley1(factor.q)
    return paley2(factor.q)


@functools.lru_cache(maxsize=16)
def _hadamard_cached(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    for factor in construction(n):
        h = torch.kron(h, _build(factor))
    return h


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n: float64 entries +-1 with `H H^T = n I`.

    Orders m * 2^k are built as the Kronecker product of Paley matrices (of order m) and
    Sylvester's (of order 2^k); see `construction`.

    Raises:
        ValueError: no construction is known for n.
    """
    return _hadamard_cached(n).clone()


KRON_FACTOR_MAX = 128
"""Sylvester factors are split into Kronecker factors of at most this order for `apply`."""


@functools.lru_cache(maxsize=64)
def kron_factors(n: int) -> tuple[torch.Tensor, ...]:
    """Small float64 matrices F_1..F_r with `hadamard(n) = kron(F_1, ..., F_r)`.

    The Paley factors as built, and Sylvester's 2^k split into orders <= KRON_FACTOR_MAX (a
    Sylvester matrix is the Kronecker power of [[1, 1], [1, -1]], so any split is exact).

    Raises:
        ValueError: no construction is known for n.
    """
    mats = []
    for factor in construction(n):
        if factor.kind != "sylvester":
            mats.append(_build(factor))
            continue
        order = factor.order
        while order > KRON_FACTOR_MAX:
            mats.append(sylvester(KRON_FACTOR_MAX))
            order //= KRON_FACTOR_MAX
        if order > 1:
            mats.append(sylvester(order))
    return tuple(mats)


def apply(x: torch.Tensor) -> torch.Tensor:
    """`x @ hadamard(n)` over the last dim, one small matmul per Kronecker factor.

    n (sum of the factor orders) multiply-adds per element instead of n^2 / n for the dense
    product (1536 = 12 x 128: 140 instead of 1536); same dtype as x, exact in float64 up to
    rounding. Factor F_i of order o acts on x viewed as [rows * before, o, after]
    (`F_i^T @ view`, or `view @ F_i` for the last factor), so no axis is ever permuted.

    Raises:
        ValueError: no construction is known for n.
    """
    n = x.shape[-1]
    rows = x.reshape(-1, n).shape[0]
    y, before = x, 1
    for mat in kron_factors(n):
        order = mat.shape[0]
        after = n // (before * order)
        mat = mat.to(device=x.device, dtype=x.dtype)
        if after == 1:
            y = y.reshape(-1, order) @ mat
        else:
            y = torch.matmul(mat.t(), y.reshape(rows * before, order, after))
        before *= order
    return y.reshape(x.shape)


def random_signs(n: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """n random +-1 values (float64) drawn from a `torch.Generator` seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The orthogonal matrix `H diag(s) / sqrt(n)` with random signs s (float64, `Q Q^T = I`).

    Raises:
        ValueError: no Hadamard construction is known for n.
    """
    return hadamard(n) * random_signs(n, seed) / math.sqrt(n)
