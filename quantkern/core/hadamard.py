"""Hadamard matrices and random orthogonal rotations (fp64), for the rotations of
:mod:`quantkern.transforms.rotation`.

``hadamard_matrix(n)`` builds an ``n x n`` matrix of ±1 with ``H @ H.T == n * I`` as a Kronecker product
of Sylvester's power-of-two construction and Paley matrices (Paley I: order ``q + 1`` for a prime
``q ≡ 3 (mod 4)`` — 12, 20, 24, 32, 44, 48, 60, …; Paley II: order ``2 (q + 1)`` for a prime
``q ≡ 1 (mod 4)`` — 12, 28, 36, 60, 76, …). That covers the hidden sizes and head dims of the usual
models (576 = 12·12·4, 896 = 28·32, 3584 = 28·128, 5120 = 20·256, head dims 64 / 80 / 96 / 128 / 256).
Sizes it cannot build (every ``n`` that is not 1, 2 or a multiple of 4 has no Hadamard matrix at all;
a few multiples of 4 are missing from these constructions) return ``None``, and
:func:`random_rotation` falls back to a random orthogonal matrix (QR of a seeded Gaussian), saying so.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("quantkern")


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` over GF(q), ``chi`` the quadratic character (q prime)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order ``q + 1``, ``q ≡ 3 (mod 4)`` prime: ``H = I + S`` with S the skew conference matrix."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order ``2 (q + 1)``, ``q ≡ 1 (mod 4)`` prime: the symmetric conference matrix C, each 0 replaced by
    ``[[1, -1], [-1, -1]]`` and each ±1 by ``±[[1, 1], [1, -1]]``."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron((c == 0).to(torch.float64), zero)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def _base_orders(limit: int) -> dict[int, tuple[str, int]]:
    """Orders (not powers of two) with a Paley construction, up to ``limit``: ``{order: (kind, q)}``."""
    out: dict[int, tuple[str, int]] = {}
    for q in range(3, limit + 1):
        if not _is_prime(q):
            continue
        if q % 4 == 3 and q + 1 <= limit:
            out.setdefault(q + 1, ("paley1", q))
        if q % 4 == 1 and 2 * (q + 1) <= limit:
            out.setdefault(2 * (q + 1), ("paley2", q))
    return {k: v for k, v in out.items() if k & (k - 1)}  # powers of two come from Sylvester


def _plan(n: int) -> tuple[int, ...] | None:
    """Factors of ``n`` (a power of two first, then Paley orders) whose Kronecker product has a
    construction, or ``None``."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return (n,)
    bases = _base_orders(n)
    for m in sorted(bases):  # smallest Paley factor first: the largest power of two
        if n % m == 0:
            rest = _plan(n // m)
            if rest is not None:
                return rest + (m,)
    return None


@functools.lru_cache(maxsize=64)
def _hadamard_cached(n: int) -> torch.Tensor | None:
    plan = _plan(n)
    if plan is None:
        return None
    bases = _base_orders(n)
    h = _sylvester(plan[0])
    for m in plan[1:]:
        kind, q = bases[m]
        h = torch.kron(h, _paley1(q) if kind == "paley1" else _paley2(q))
    return h


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """An ``n x n`` fp64 Hadamard matrix (entries ±1, ``H @ H.T == n I``), or ``None`` when these
    constructions have none of that size."""
    h = _hadamard_cached(int(n))
    return None if h is None else h.clone()


def has_hadamard(n: int) -> bool:
    return _plan(int(n)) is not None


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random ``n x n`` orthogonal fp64 matrix: QR of a Gaussian, signs fixed by R's diagonal."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones((), dtype=torch.float64))


def random_rotation(n: int, generator: torch.Generator, what: str = "") -> tuple[torch.Tensor, str]:
    """``(Q, kind)``: the randomised Hadamard rotation ``diag(s) H / sqrt(n)`` (``s`` random ±1 signs,
    ``kind="hadamard"``), or, where no Hadamard matrix of size ``n`` is built here, a random orthogonal
    matrix (``kind="orthogonal"``, logged naming ``what``). fp64, orthogonal: ``Q @ Q.T == I``."""
    h = hadamard_matrix(n)
    if h is None:
        logger.warning("quantkern: no Hadamard matrix of size %d%s; using a random orthogonal matrix (QR of a seeded "
                       "Gaussian) instead", n, f" ({what})" if what else "")
        return random_orthogonal(n, generator), "orthogonal"
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * h / n ** 0.5, "hadamard"
