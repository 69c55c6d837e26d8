"""Rotation plans (QuaRot, SpinQuant): *which* orthogonal map each site gets. The equivalence engine
decides where it can go (:mod:`qcompile.equivalence`), :mod:`qcompile.quant.hadamard` builds the matrices.

Sites (docs/methods.md, "Rotation"):

| stage      | where                                 | map                                 | how          |
|------------|---------------------------------------|-------------------------------------|--------------|
| R1         | residual stream (hidden)              | Q: (random) Hadamard, else random   | offline      |
|            |                                       | orthogonal (QR) — any Q is exact    |              |
| R2         | v rows / o columns, per head          | H_d per head (head_dim)             | offline      |
| R3         | q and k after RoPE (head_dim)         | H_d on both, cancels in q kᵀ        | online, pair |
| R4         | down_proj input (intermediate)        | fast Hadamard, or block-diagonal    | online       |
| cross-head | o_proj input, across heads            | H_heads ⊗ I_d (QuaRot only)         | online       |

Offline maps may be any orthogonal matrix; online ones need a fast transform (a Hadamard of order
``K·2^m``, or block-diagonal Hadamards when the width has none), and each choice is reported with the
kind actually used. Seeds are derived per site (stage, layer) from one user seed, so a run is
reproducible and layers get independent random Hadamards (QuaRot randomises each R2 per layer).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from qcompile.equivalence.online import OnlineOp
from qcompile.ops.hadamard import HADAMARD as HADAMARD_OP
from qcompile.ops.hadamard import hadamard_op_call_args
from qcompile.quant.hadamard import has_hadamard, offline_rotation, online_plan, plan_matrix

F64 = torch.float64

HADAMARD = "hadamard"
RANDOM_HADAMARD = "random hadamard"
RANDOM_ORTHOGONAL = "random orthogonal"
BLOCK_HADAMARD = "block-diagonal hadamard"
SKIPPED = "skipped"


@dataclass
class RotationSite:
    """One site of the plan and what it got (for the rotate pass's report)."""

    stage: str  # R1 | R2 | R3 | R4 | cross-head
    site: str  # human text: "residual stream", "layer 3 v→o", ...
    layer: int | None
    size: int
    rotation: str  # HADAMARD | RANDOM_HADAMARD | RANDOM_ORTHOGONAL | BLOCK_HADAMARD | SKIPPED
    description: str  # what was built, or why the site was skipped
    nodes: list[str] = field(default_factory=list)  # inserted op nodes (online stages)
    constants_changed: int = 0
    untied: list[str] = field(default_factory=list)


def site_seed(seed: int, stage: str, layer: int | None = None) -> int:
    """A per-site seed from the user's seed: stable across runs and Python versions (crc32)."""
    return (seed * 1_000_003 + zlib.crc32(f"{stage}:{layer}".encode())) % (2**31 - 1)


def offline_map(n: int, seed: int, randomized: bool) -> tuple[torch.Tensor, str, str]:
    """An orthogonal ``[n, n]`` float64 map for an offline site: ``(Q, kind, description)``.

    A (random) Hadamard where one of order n exists, else a random orthogonal matrix (QR of a Gaussian):
    offline merges accept any orthogonal Q (docs/methods.md), and the kind says which one this is.
    """
    q, description = offline_rotation(n, seed, randomized=randomized)
    if has_hadamard(n):
        kind = RANDOM_HADAMARD if randomized else HADAMARD
    else:
        kind = RANDOM_ORTHOGONAL
    return torch.as_tensor(q).to(F64), kind, description


def online_hadamard(n: int) -> tuple[OnlineOp | None, str, str]:
    """The online Hadamard op for a width-``n`` input (R4, R3): ``(op or None, kind, description)``.

    Exact where a Hadamard of order n exists; block-diagonal Hadamards (the largest block dividing n
    that has one) otherwise; None (SKIPPED) when only the identity is left (no divisor > 1 has one).
    """
    plan = online_plan(n)
    if plan.is_identity:
        return None, SKIPPED, plan.description
    op = OnlineOp(HADAMARD_OP, hadamard_op_call_args(plan), plan_matrix(plan), plan.description)
    return op, (HADAMARD if plan.kind == "exact" else BLOCK_HADAMARD), plan.description


def cross_head_hadamard(num_heads: int, head_dim: int) -> tuple[OnlineOp | None, str, str]:
    """QuaRot's online Hadamard across heads before o_proj: ``M = H_heads ⊗ I_head_dim``.

    Needs an exact Hadamard of order ``num_heads`` (a block-diagonal one would not mix all heads).
    """
    plan = online_plan(num_heads)
    if plan.kind != "exact":
        return (
            None,
            SKIPPED,
            (
                f"no Hadamard of order {num_heads} ({num_heads} heads is not K·2^m for a known K); "
                "the per-head R2 rotation still applies (SpinQuant omits this transform too)"
            ),
        )
    matrix = torch.kron(plan_matrix(plan), torch.eye(head_dim, dtype=F64))
    description = f"H_{num_heads} ⊗ I_{head_dim} across heads ({plan.description})"
    op = OnlineOp(HADAMARD_OP, hadamard_op_call_args(plan), matrix, description, (num_heads, head_dim))
    return op, HADAMARD, description


def online_matrix(n: int) -> torch.Tensor | None:
    """The ``[n, n]`` matrix the R4 online Hadamard computes on a width-``n`` input (SmoothRot's
    objective), or None when R4 would be skipped (no Hadamard of any divisor > 1)."""
    plan = online_plan(n)
    return None if plan.is_identity else plan_matrix(plan)
