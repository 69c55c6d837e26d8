"""Hadamard matrices and the fast Walsh–Hadamard transform for rotations (QuaRot, SpinQuant).

Sizes: ``n = K·2^m`` with K in :data:`SUPPORTED_K` (docs/methods.md, "Rotation"); the matrix is
``H_K ⊗ H_{2^m} / √n`` with ``H_K`` from :mod:`qcompile.quant.hadamard_k` (Paley 1933, Sylvester doubling,
Williamson 1944, Baumert–Hall 1965) and ``H_{2^m}`` Sylvester's (1867) in natural order. Applied to
the last dim of ``x`` as ``x @ (H_K ⊗ H_{2^m})``: with ``x`` viewed as [..., K, 2^m], that is an
FWHT over the 2^m axis (O(n log n)) and a dense K×K matmul over the K axis — never an n×n matrix.

Sizes with no Hadamard get deliberate fallbacks, and every function says which it used:

- offline merges (R1, R2 folded into weights) accept any orthogonal matrix: :func:`offline_rotation`
  gives a (random) Hadamard where one exists, else a seeded random orthogonal matrix (QR);
- online transforms (R4 before down_proj, R3, the cross-head Hadamard) need a fast transform:
  :func:`online_plan` gives the exact one, else a block-diagonal Hadamard (largest block dividing
  n that has one; a block of 1 means no rotation is possible), or — only when asked — zero padding
  to the next size that has one (the consumer then reads the padded width).

SmolLM2-135M: hidden 576 = 36·16 and intermediate 1536 = 12·128 are exact; its 9 heads have no
Hadamard (order 9 is odd; 3 and 9 have none either), so the cross-head rotation is a random
orthogonal matrix offline, and online it is the identity (a plan with ``block == 1``) unless padding
to 12 is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompile.quant.hadamard_k import K_CONSTRUCTIONS, SUPPORTED_K, k_matrix

__all__ = [
    "SUPPORTED_K",
    "HadamardError",
    "OnlineHadamardPlan",
    "fwht",
    "hadamard_factor",
    "hadamard_matrix",
    "hadamard_transform",
    "has_hadamard",
    "offline_rotation",
    "online_plan",
    "plan_from_op_args",
    "plan_matrix",
    "random_hadamard_matrix",
    "random_orthogonal_matrix",
]


class HadamardError(ValueError):
    """A size with no (supported) Hadamard matrix, or an input that does not fit a plan."""


SUPPORTED_SIZES = f"n = K·2^m with K in {{{', '.join(map(str, SUPPORTED_K))}}}"


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard_factor(n: int) -> tuple[int, int] | None:
    """``(K, 2^m)`` with ``n = K·2^m`` for the largest supported K, or None if n has no Hadamard here."""
    for k in sorted(SUPPORTED_K, reverse=True):
        if n >= k and n % k == 0 and _is_power_of_two(n // k):
            return k, n // k
    return None


def has_hadamard(n: int) -> bool:
    return hadamard_factor(n) is not None


def _factor_or_raise(n: int, k: int | None = None) -> tuple[int, int]:
    if k is not None:  # a pinned K (from an op's arguments): 40·2 and 20·4 are different matrices
        if k in K_CONSTRUCTIONS and n % k == 0 and _is_power_of_two(n // k):
            return k, n // k
        raise HadamardError(f"no Hadamard of order {n} with K = {k}: supported sizes are {SUPPORTED_SIZES}")
    factor = hadamard_factor(n)
    if factor is None:
        raise HadamardError(
            f"no Hadamard matrix of order {n}: supported sizes are {SUPPORTED_SIZES}. Offline merges can "
            "use random_orthogonal_matrix / offline_rotation; online ones online_plan (block-diagonal or "
            "padded)"
        )
    return factor


def describe_size(n: int, k: int | None = None) -> str:
    """``"576 = 36·16 (K = 36: Paley II, q = 17)"``, ``"64 = 2^6"``."""
    k, p = _factor_or_raise(n, k)
    if k == 1:
        return f"{n} = 2^{p.bit_length() - 1}"
    size = f"{n}" if p == 1 else f"{n} = {k}·{p}"
    return f"{size} (K = {k}: {K_CONSTRUCTIONS[k][1]})"


def sylvester_matrix(p: int) -> Tensor:
    """Sylvester's ±1 Hadamard matrix of order p = 2^m (1867), natural order, int64."""
    if not _is_power_of_two(p):
        raise HadamardError(f"Sylvester's construction needs a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, *, k: int | None = None) -> Tensor:
    """The normalised (orthogonal) Hadamard matrix ``(H_K ⊗ H_{2^m}) / √n``.

    ``k`` pins K where several factorisations exist (80 = 40·2 = 20·4); by default the largest.
    Raises :class:`HadamardError` naming n and the supported sizes.
    """
    k, p = _factor_or_raise(n, k)
    h = torch.kron(k_matrix(k), sylvester_matrix(p)).to(torch.float64) / math.sqrt(n)
    return h.to(dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)  # never the global RNG


def random_hadamard_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``H · diag(s)`` with seeded random signs s ∈ {±1}ⁿ (QuaRot's randomised Hadamard); orthogonal."""
    signs = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64) * 2 - 1
    return (hadamard_matrix(n) * signs.to(torch.float64)).to(dtype)


def random_orthogonal_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Haar-random orthogonal matrix: QR of a seeded Gaussian, columns signed by ``sign(diag R)``
    (Mezzadri 2007) so the distribution is uniform and the result unique for the seed."""
    gaussian = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return (q * signs).to(dtype)


def offline_rotation(
    n: int, seed: int, randomized: bool = True, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, str]:
    """The orthogonal matrix for an offline merge of size n, and what it is.

    A (random, if ``randomized``) Hadamard when n has one; otherwise — deliberately — a seeded random
    orthogonal matrix, since a merged rotation need not be fast. The description is for the pass
    report: ``"random Hadamard 576 = 36·16 (K = 36: Paley II, q = 17), seed 0"``,
    ``"random orthogonal (QR, seed 0): no Hadamard of order 9"``.
    """
    if has_hadamard(n):
        if randomized:
            return random_hadamard_matrix(n, seed, dtype), f"random Hadamard {describe_size(n)}, seed {seed}"
        return hadamard_matrix(n, dtype), f"Hadamard {describe_size(n)}"
    return (
        random_orthogonal_matrix(n, seed, dtype),
        f"random orthogonal (QR, seed {seed}): no Hadamard of order {n}",
    )


PlanKind = Literal["exact", "block_diagonal", "padded"]


@dataclass(frozen=True)
class OnlineHadamardPlan:
    """How an online Hadamard of input width ``n`` is applied.

    - ``exact``: ``x @ H_n``; ``block == n``.
    - ``block_diagonal``: ``n // block`` independent Hadamards of order ``block`` on consecutive
      channel groups; ``block == 1`` is the identity — no rotation is possible (see
      :attr:`is_identity`), and callers should treat it so.
    - ``padded``: ``x`` is zero-padded to ``block > n`` channels, then ``@ H_block``; the output is
      ``block`` wide (the consumer's weight is padded with zero columns before H is merged).

    ``k`` is the K of ``block = k·2^m``, pinned so the op's integers rebuild exactly this matrix.
    """

    n: int
    kind: PlanKind
    block: int
    k: int
    description: str

    def __post_init__(self) -> None:
        _factor_or_raise(self.block, self.k)
        valid = {
            "exact": self.block == self.n,
            "block_diagonal": self.block < self.n and self.n % self.block == 0,
            "padded": self.block > self.n,
        }
        if not valid.get(self.kind, False):
            raise HadamardError(f"inconsistent online Hadamard plan: {self}")

    @property
    def is_identity(self) -> bool:
        return self.block == 1

    @property
    def num_blocks(self) -> int:
        return self.n // self.block if self.kind == "block_diagonal" else 1

    @property
    def out_features(self) -> int:
        return self.block if self.kind == "padded" else self.n


def _largest_hadamard_divisor(n: int) -> int:
    return max(b for b in range(1, n + 1) if n % b == 0 and has_hadamard(b))


def _smallest_hadamard_at_least(n: int) -> int:
    size = n
    while not has_hadamard(size):  # stops at the next power of two at the latest
        size += 1
    return size


def _describe_plan(n: int, kind: PlanKind, block: int, k: int) -> str:
    if kind == "exact":
        return f"Hadamard {describe_size(n, k)}"
    if kind == "padded":
        return (
            f"padded Hadamard: no Hadamard of order {n}, zero-padded by {block - n} to "
            f"{describe_size(block, k)}; the output is {block} wide"
        )
    if block == 1:
        return (
            f"identity (no rotation possible): no Hadamard of order {n} nor of any divisor > 1 "
            f"(block-diagonal with blocks of 1)"
        )
    return (
        f"block-diagonal Hadamard, {n // block} blocks of {describe_size(block, k)}: no Hadamard of order {n}"
    )


def plan_from_op_args(n: int, block: int, k: int) -> OnlineHadamardPlan:
    """Rebuild a plan from the integers of a ``qcompile::hadamard`` call (see :mod:`qcompile.ops.hadamard`)."""
    kind: PlanKind = "exact" if block == n else ("padded" if block > n else "block_diagonal")
    return OnlineHadamardPlan(n, kind, block, k, _describe_plan(n, kind, block, k))


def online_plan(n: int, allow_padding: bool = False) -> OnlineHadamardPlan:
    """The online Hadamard for width n: exact when n has one; otherwise block-diagonal with the
    largest block dividing n that has a Hadamard (block 1 = identity, said so in the description);
    with ``allow_padding``, zero padding to the smallest size ≥ n that has one instead."""
    if n < 1:
        raise HadamardError(f"online Hadamard of order {n}: the width must be positive")
    factor = hadamard_factor(n)
    if factor is not None:
        return plan_from_op_args(n, n, factor[0])
    if allow_padding:
        padded = _smallest_hadamard_at_least(n)
        return plan_from_op_args(n, padded, _factor_or_raise(padded)[0])
    block = _largest_hadamard_divisor(n)
    return plan_from_op_args(n, block, _factor_or_raise(block)[0])


def plan_matrix(plan: OnlineHadamardPlan, dtype: torch.dtype = torch.float64) -> Tensor:
    """The dense ``[n, out_features]`` matrix M with ``hadamard_transform(x, plan) == x @ M`` — for
    exporters (a MatMul with a constant), for merging into the consumer, and for tests."""
    h = hadamard_matrix(plan.block, dtype, k=plan.k)
    if plan.kind == "block_diagonal":
        return torch.block_diag(*[h] * plan.num_blocks)
    if plan.kind == "padded":
        return h[: plan.n]  # zero-padded rows contribute nothing
    return h


def fwht(x: Tensor, normalize: bool = True) -> Tensor:
    """Fast Walsh–Hadamard transform over the last dim (a power of two): ``x @ H_n`` with Sylvester's
    ``H_n`` in natural order, divided by √n if ``normalize``. log₂ n butterfly stages of
    additions, O(n log n) per row; half-precision inputs are computed in float32 and cast back."""
    n = x.shape[-1]
    if not _is_power_of_two(n):
        raise HadamardError(f"fwht: the last dim must be a power of two, got {n}")
    out_dtype = x.dtype
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    lead = x.shape[:-1]
    h = 1
    while h < n:
        # H_n = H_2 ⊗ … ⊗ H_2: stage h applies H_2 to the pair of entries h apart.
        pairs = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs.unbind(-2)
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(*lead, n)
    if normalize:
        y = y * (1.0 / math.sqrt(n))
    return y.to(out_dtype)


def _kron_transform(x: Tensor, block: int, k: int) -> Tensor:
    """``x @ (H_k ⊗ H_p) / √block`` over the last dim (= block = k·p): with x as [..., k, p] that is
    ``H_kᵀ · X · H_p`` — the FWHT on the p axis, a k×k matmul on the k axis."""
    p = block // k
    lead = x.shape[:-1]
    y = fwht(x.reshape(*lead, k, p), normalize=False)
    if k > 1:
        y = torch.matmul(k_matrix(k).T.to(y.dtype), y)
    return (y * (1.0 / math.sqrt(block))).reshape(*lead, block)


def hadamard_transform(x: Tensor, plan: OnlineHadamardPlan) -> Tensor:
    """Apply an online plan to the last dim of x: equals ``x @ plan_matrix(plan)`` (to fp rounding)
    without building it. Half-precision inputs are computed in float32 and cast back."""
    if x.shape[-1] != plan.n:
        raise HadamardError(
            f"hadamard_transform: last dim {x.shape[-1]} does not match the plan's width {plan.n} "
            f"({plan.description})"
        )
    if plan.is_identity:
        return x.clone()
    out_dtype = x.dtype
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    lead = x.shape[:-1]
    if plan.kind == "padded":
        y = _kron_transform(F.pad(y, (0, plan.block - plan.n)), plan.block, plan.k)
    elif plan.kind == "block_diagonal":
        blocks = y.reshape(*lead, plan.num_blocks, plan.block)
        y = _kron_transform(blocks, plan.block, plan.k).reshape(*lead, plan.n)
    else:
        y = _kron_transform(y, plan.block, plan.k)
    return y.to(out_dtype)
