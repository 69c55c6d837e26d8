"""The K-matrices: ±1 Hadamard matrices of the orders K that are not powers of two.

A Hadamard matrix of order n has entries ±1 and ``H Hᵀ = n I``. :mod:`qcompile.quant.hadamard` builds
every size ``n = K·2^m`` as ``H_K ⊗ H_{2^m}`` (Sylvester 1867 for the power of two); this module
constructs the ``H_K`` themselves, each from a standard construction, computed here in integer
arithmetic (no tables copied from elsewhere) and checked exactly by ``tests/test_hadamard.py``:

====  ===========================================================================================
K     construction
====  ===========================================================================================
1     ``[1]`` (the powers of two are Sylvester's)
12    Paley I (Paley 1933), q = 11
20    Paley I, q = 19
28    Paley II, q = 13
36    Paley II, q = 17
40    Sylvester doubling of the Paley I matrix of order 20: ``H_2 ⊗ H_20``
52    Paley II, q = 25 over GF(25) = GF(5)[x]/(x² + x + 1)
60    Paley I, q = 59
108   Paley I, q = 107
140   Paley I, q = 139
156   Baumert–Hall (1965): the T-sequences of length 3 times Williamson matrices of order 13, in the
      Goethals–Seidel array (Goethals & Seidel 1967)
172   Williamson (1944) array with Williamson matrices of order 43 that are unions of the cosets of
      the multiplicative subgroup of order 6 of GF(43)
====  ===========================================================================================

Paley I: for a prime power q ≡ 3 (mod 4), ``H = [[1, 1ᵀ], [−1, Q + I]]`` of order q + 1, with the
Jacobsthal matrix ``Q[a, b] = χ(a − b)`` (χ the quadratic character of GF(q)). Paley II: for
q ≡ 1 (mod 4), the symmetric conference matrix ``C = [[0, 1ᵀ], [1, Q]]`` gives
``H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]`` of order 2(q + 1).

Williamson: four symmetric circulant ±1 matrices A, B, C, D of odd order w with
``A² + B² + C² + D² = 4w I`` (they commute, being circulant) give the Hadamard matrix
``[[A, B, C, D], [−B, A, −D, C], [−C, D, A, −B], [−D, −C, B, A]]`` of order 4w. They are found here by
an exhaustive meet-in-the-middle search over sequences that are constant on the cosets of a
multiplicative subgroup containing −1 (so symmetric): 2^6 sequences for w = 13 (all symmetric ones),
2^7 for w = 43 — milliseconds, deterministic (the first solution in a fixed order).
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

IntMatrix = list[list[int]]


class _FiniteField:
    """GF(p^k) for the small fields Paley needs; an element is the int whose base-p digits are the
    coefficients of its polynomial (constant term first), reduced modulo a monic irreducible."""

    def __init__(self, p: int, k: int = 1) -> None:
        self.p, self.k, self.q = p, k, p**k
        self.modulus = self._irreducible() if k > 1 else [0, 1]

    def _digits(self, a: int) -> list[int]:
        return [(a // self.p**i) % self.p for i in range(self.k)]

    def _number(self, digits: list[int]) -> int:
        return sum(d * self.p**i for i, d in enumerate(digits))

    def _irreducible(self) -> list[int]:
        # Degree ≤ 3: irreducible iff no root in GF(p). Coefficients constant term first, monic.
        if self.k > 3:
            raise ValueError(f"GF({self.p}^{self.k}): only extension degrees ≤ 3 are implemented")
        for low in itertools.product(range(self.p), repeat=self.k):
            poly = [*low, 1]
            if all(sum(c * x**i for i, c in enumerate(poly)) % self.p for x in range(self.p)):
                return poly
        raise AssertionError("unreachable: every GF(p^k) has an irreducible of degree k")

    def sub(self, a: int, b: int) -> int:
        return self._number([(x - y) % self.p for x, y in zip(self._digits(a), self._digits(b), strict=True)])

    def mul(self, a: int, b: int) -> int:
        prod = [0] * (2 * self.k - 1)
        for i, x in enumerate(self._digits(a)):
            for j, y in enumerate(self._digits(b)):
                prod[i + j] += x * y
        for deg in range(len(prod) - 1, self.k - 1, -1):  # reduce by the monic modulus
            c, prod[deg] = prod[deg], 0
            for i, m in enumerate(self.modulus[:-1]):
                prod[deg - self.k + i] -= c * m
        return self._number([c % self.p for c in prod[: self.k]])

    def quadratic_character(self) -> list[int]:
        """χ(x) for every element x: 0 at 0, +1 on the nonzero squares, −1 elsewhere."""
        squares = {self.mul(x, x) for x in range(1, self.q)}
        return [0] + [1 if x in squares else -1 for x in range(1, self.q)]


def _prime_power(q: int) -> tuple[int, int]:
    for p in range(2, q + 1):
        if q % p == 0:
            k = 0
            while q % p == 0:
                q, k = q // p, k + 1
            if q != 1:
                raise ValueError(f"{p**k * q} is not a prime power")
            return p, k
    raise ValueError(f"{q} is not a prime power")


def jacobsthal(q: int) -> IntMatrix:
    """The Jacobsthal matrix ``Q[a, b] = χ(a − b)`` of GF(q)."""
    field = _FiniteField(*_prime_power(q))
    chi = field.quadratic_character()
    return [[chi[field.sub(a, b)] for b in range(q)] for a in range(q)]


def paley_i(q: int) -> IntMatrix:
    """Paley's first construction (1933): order q + 1 for a prime power q ≡ 3 (mod 4)."""
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q ≡ 3 (mod 4), got q = {q}")
    jac = jacobsthal(q)
    rows = [[1] * (q + 1)]
    for a in range(q):
        rows.append([-1] + [jac[a][b] + (1 if a == b else 0) for b in range(q)])
    return rows


def paley_ii(q: int) -> IntMatrix:
    """Paley's second construction (1933): order 2(q + 1) for a prime power q ≡ 1 (mod 4)."""
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q ≡ 1 (mod 4), got q = {q}")
    jac = jacobsthal(q)
    conference = [[0] + [1] * q] + [[1] + jac[a] for a in range(q)]
    on, off = [[1, 1], [1, -1]], [[1, -1], [-1, -1]]  # zero entries of C (its diagonal) take `off`
    n = q + 1
    return [
        [conference[i][j] * on[a][b] if i != j else off[a][b] for j in range(n) for b in range(2)]
        for i in range(n)
        for a in range(2)
    ]


def sylvester_double(h: IntMatrix) -> IntMatrix:
    """Sylvester's doubling (1867): ``[[H, H], [H, −H]]`` = ``H_2 ⊗ H``."""
    return [row + row for row in h] + [row + [-x for x in row] for row in h]


def _circulant(first_row: list[int]) -> IntMatrix:
    n = len(first_row)
    return [[first_row[(j - i) % n] for j in range(n)] for i in range(n)]


def _periodic_autocorrelation(seq: list[int]) -> tuple[int, ...]:
    n = len(seq)
    return tuple(sum(seq[i] * seq[(i + s) % n] for i in range(n)) for s in range(1, n))


def _multiplicative_order(x: int, w: int) -> int:
    return next(e for e in range(1, w) if pow(x, e, w) == 1)


def williamson_sequences(w: int, subgroup_order: int) -> tuple[list[int], ...]:
    """First rows of Williamson matrices of prime order w: four symmetric ±1 sequences whose periodic
    autocorrelations sum to 0 at every nonzero shift (equivalently ``A² + B² + C² + D² = 4w I``).

    Searched among the sequences with a₀ = 1 that are constant on each coset of the multiplicative
    subgroup of GF(w) of order ``subgroup_order`` (even, so the subgroup holds −1 and the sequences
    are symmetric): pairs (A, B) keyed by their summed autocorrelation meet pairs (C, D) with the
    negated key. Deterministic; raises if that subspace holds no solution.
    """
    if subgroup_order % 2 or (w - 1) % subgroup_order:
        raise ValueError(f"subgroup order {subgroup_order} must be even and divide {w - 1}")
    # GF(w)* is cyclic, so the subgroup of each order is unique: generated by any element of that order.
    gen = next(x for x in range(2, w) if _multiplicative_order(x, w) == subgroup_order)
    subgroup = {pow(gen, e, w) for e in range(subgroup_order)}
    cosets, seen = [], set()
    for x in range(1, w):
        if x not in seen:
            coset = sorted(x * s % w for s in subgroup)
            seen.update(coset)
            cosets.append(coset)
    candidates = []
    for signs in itertools.product((1, -1), repeat=len(cosets)):
        seq = [1] * w
        for sign, coset in zip(signs, cosets, strict=True):
            for i in coset:
                seq[i] = sign
        candidates.append(seq)
    paf = [_periodic_autocorrelation(s) for s in candidates]
    pairs = list(itertools.combinations_with_replacement(range(len(candidates)), 2))
    first_pair_with_sum: dict[tuple[int, ...], tuple[int, int]] = {}
    for i, j in pairs:
        first_pair_with_sum.setdefault(tuple(a + b for a, b in zip(paf[i], paf[j], strict=True)), (i, j))
    for i, j in pairs:
        match = first_pair_with_sum.get(tuple(-a - b for a, b in zip(paf[i], paf[j], strict=True)))
        if match is not None:
            return tuple(candidates[t] for t in (i, j, *match))
    raise ValueError(f"no Williamson matrices of order {w} constant on cosets of order {subgroup_order}")


def _blocks(grid: list[list[IntMatrix]]) -> IntMatrix:
    return [sum((block[r] for block in row), []) for row in grid for r in range(len(row[0]))]


def _neg(m: IntMatrix) -> IntMatrix:
    return [[-x for x in row] for row in m]


def _matmul(a: IntMatrix, b: IntMatrix) -> IntMatrix:
    cols = list(zip(*b, strict=True))
    return [[sum(x * y for x, y in zip(row, col, strict=True)) for col in cols] for row in a]


def _transpose(m: IntMatrix) -> IntMatrix:
    return [list(col) for col in zip(*m, strict=True)]


def _williamson_array(a: IntMatrix, b: IntMatrix, c: IntMatrix, d: IntMatrix) -> IntMatrix:
    """Williamson's array (1944); needs A..D symmetric and pairwise commuting."""
    nb, nc, nd = _neg(b), _neg(c), _neg(d)
    return _blocks([[a, b, c, d], [nb, a, nd, c], [nc, d, a, nb], [nd, nc, b, a]])


def williamson(w: int, subgroup_order: int) -> IntMatrix:
    """Hadamard matrix of order 4w from Williamson matrices (see :func:`williamson_sequences`)."""
    return _williamson_array(*(_circulant(s) for s in williamson_sequences(w, subgroup_order)))


def baumert_hall_t3(w: int, subgroup_order: int) -> IntMatrix:
    """Order 12w: the trivial T-sequences of length 3 (unit vectors e₀, e₁, e₂ and 0) times
    Williamson matrices A, B, C, D of order w give block-circulant matrices
    ``X_i = Σ_j circ(T_j) ⊗ M_ij`` (M the Williamson array) with ``Σ X_i X_iᵀ = 12w I``; they commute
    and satisfy ``X R = R Xᵀ`` for ``R = R_3 ⊗ I_w`` (R_3 the back-diagonal), so the Goethals–Seidel
    array (1967) makes them a Hadamard matrix (Baumert & Hall 1965; Cooper & Wallis 1972)."""
    a, b, c, d = (_circulant(s) for s in williamson_sequences(w, subgroup_order))
    zero = [[0] * w for _ in range(w)]
    # Rows of the Williamson array: which of A..D (with sign) multiplies circ(T_j) in X_i.
    coeffs = [[a, b, c, d], [_neg(b), a, _neg(d), c], [_neg(c), d, a, _neg(b)], [_neg(d), _neg(c), b, a]]
    t = 3

    def block_circulant(row: list[IntMatrix]) -> IntMatrix:
        # circ(e_j) is the shift by j: block (r, (r + j) mod 3) holds row[j]; T_4 = 0 drops row[3].
        return _blocks([[row[(col - r) % t] for col in range(t)] for r in range(t)])

    x = [block_circulant(row) for row in coeffs]
    back = [[1 if i + j == t - 1 else 0 for j in range(t)] for i in range(t)]
    eye = [[1 if i == j else 0 for j in range(w)] for i in range(w)]
    r = _blocks([[eye if back[i][j] else zero for j in range(t)] for i in range(t)])

    def xr(m: IntMatrix) -> IntMatrix:
        return _matmul(m, r)

    def xtr(m: IntMatrix) -> IntMatrix:
        return _matmul(_transpose(m), r)

    x1, x2, x3, x4 = x
    return _blocks(
        [
            [x1, xr(x2), xr(x3), xr(x4)],
            [_neg(xr(x2)), x1, xtr(x4), _neg(xtr(x3))],
            [_neg(xr(x3)), _neg(xtr(x4)), x1, xtr(x2)],
            [_neg(xr(x4)), xtr(x3), _neg(xtr(x2)), x1],
        ]
    )


# K → (builder of the ±1 matrix, how it is built). Callers pick the largest K that fits a size
# (``qcompile.quant.hadamard.hadamard_factor``).
K_CONSTRUCTIONS = {
    1: (lambda: [[1]], "trivial"),
    12: (lambda: paley_i(11), "Paley I, q = 11"),
    20: (lambda: paley_i(19), "Paley I, q = 19"),
    28: (lambda: paley_ii(13), "Paley II, q = 13"),
    36: (lambda: paley_ii(17), "Paley II, q = 17"),
    40: (lambda: sylvester_double(paley_i(19)), "Sylvester doubling of Paley I, q = 19"),
    52: (lambda: paley_ii(25), "Paley II, q = 25 over GF(25)"),
    60: (lambda: paley_i(59), "Paley I, q = 59"),
    108: (lambda: paley_i(107), "Paley I, q = 107"),
    140: (lambda: paley_i(139), "Paley I, q = 139"),
    156: (lambda: baumert_hall_t3(13, 2), "Baumert–Hall: T-sequences of length 3 × Williamson order 13"),
    172: (lambda: williamson(43, 6), "Williamson, order 43 (cosets of the order-6 subgroup of GF(43)*)"),
}
SUPPORTED_K: tuple[int, ...] = tuple(sorted(K_CONSTRUCTIONS))


@functools.cache
def _k_matrix_cached(k: int) -> Tensor:
    return torch.tensor(K_CONSTRUCTIONS[k][0](), dtype=torch.int64)


def k_matrix(k: int) -> Tensor:
    """The ±1 Hadamard matrix ``H_K`` (int64, unnormalised) for a K in :data:`SUPPORTED_K`.

    Built once per process and copied on return (a pure cache: the matrix is a function of K).
    """
    if k not in K_CONSTRUCTIONS:
        raise KeyError(f"no K-matrix of order {k}; supported K: {', '.join(map(str, SUPPORTED_K))}")
    return _k_matrix_cached(k).clone()
