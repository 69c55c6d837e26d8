"""The ``qcompile::hadamard`` custom op: an online Hadamard rotation as one node of a torch program.

Schema::

    qcompile::hadamard(Tensor x, int n, int block, int k) -> Tensor

The integers alone determine the transform (:func:`qcompile.quant.hadamard.plan_from_op_args`), so an
exporter can rebuild it as a MatMul with the constant :func:`qcompile.quant.hadamard.plan_matrix` (or a
fast kernel) without any side table:

- ``n``: width of x's last dim;
- ``block``: the Hadamard order applied — ``block == n`` exact, ``block < n`` (dividing n)
  block-diagonal with ``n // block`` blocks (``block == 1`` is the identity), ``block > n`` x
  zero-padded to ``block`` (the output is ``block`` wide);
- ``k``: the K of ``block = K·2^m`` (pinned: 80 = 40·2 and 20·4 are different matrices).

The reference implementation is :func:`qcompile.quant.hadamard.hadamard_transform` (FWHT on the 2^m part,
K×K matmul); the fake implementation gives the output shape and keeps the dtype. Defined through
:mod:`qcompile.ops.registry`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompile.ops.registry import define
from qcompile.quant.hadamard import HadamardError, OnlineHadamardPlan, hadamard_transform, plan_from_op_args


@define("hadamard", "(Tensor x, int n, int block, int k) -> Tensor")
def hadamard(x: Tensor, n: int, block: int, k: int) -> Tensor:
    """``x @ plan_matrix(plan_from_op_args(n, block, k))`` over the last dim, without the matrix."""
    return hadamard_transform(x, plan_from_op_args(n, block, k))


@hadamard.register_fake
def _hadamard_fake(x: Tensor, n: int, block: int, k: int) -> Tensor:
    plan = plan_from_op_args(n, block, k)  # validates the integers at trace time too
    torch._check(
        x.shape[-1] == n,
        lambda: f"qcompile::hadamard: last dim {x.shape[-1]} does not match n = {n}",
    )
    return x.new_empty((*x.shape[:-1], plan.out_features))


def hadamard_op_call_args(plan: OnlineHadamardPlan) -> tuple[int, int, int]:
    """The integer arguments ``(n, block, k)`` of the ``qcompile::hadamard`` call for a plan."""
    if plan_from_op_args(plan.n, plan.block, plan.k).kind != plan.kind:
        raise HadamardError(f"plan does not round-trip through the op's arguments: {plan}")
    return plan.n, plan.block, plan.k


# The OpOverload passes insert and later passes match (one place, never compared as strings).
HADAMARD = torch.ops.qcompile.hadamard.default
