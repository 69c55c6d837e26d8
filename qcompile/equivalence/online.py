"""Online transforms: the half of ``T·T⁻¹`` that no constant can absorb stays in the graph as an op.

docs/architecture.md ("The equivalence engine"): "a half that cannot be absorbed stays in the graph as an explicit
op (an *online* transform, e.g. the R4 Hadamard before down_proj)". For a linear ``y = x Wᵀ``:

- :func:`insert_online_transform` puts an op computing ``x → x M`` in front of the linear at run time
  and absorbs the inverse into the linear's columns, ``W ← W M⁻ᵀ`` (``W M`` for orthogonal M), merged
  in float64: QuaRot's R4 (online Hadamard on the down_proj input) and its cross-head Hadamard before
  o_proj.
- :func:`insert_cancelling_pair` puts the same orthogonal op on both operands of a product that
  contracts their last dim, so it cancels with nothing absorbed: QuaRot's R3 (Hadamard on Q and K
  after RoPE, ``(q H)(k H)ᵀ = q kᵀ``).

Before touching the graph the op is run on a random probe and compared with ``x M``: an op that does
not compute the matrix it claims is refused. Every inserted node gets ``meta["val"]`` from the op's
fake implementation under the graph's own FakeTensorMode (so symbolic batch/sequence sizes stay).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from qcompile.analysis import patterns as P
from qcompile.equivalence.constants import ConstantChange, write_updates
from qcompile.equivalence.errors import EquivalenceError
from qcompile.equivalence.producers import ConstantUpdate
from qcompile.ir import QGraph

aten = torch.ops.aten
F64 = torch.float64
# |op(x) − x M| / max|x M| accepted on the probe (float32 ops, float64 reference).
OP_CHECK_RTOL = 1e-5
# max |MᵀM − I| under which M counts as orthogonal (then M⁻ᵀ = M exactly, no inverse computed).
ORTHOGONAL_TOL = 1e-8


@dataclass(frozen=True)
class OnlineOp:
    """An op that computes ``x → x M`` on the last dim of ``x`` at run time.

    ``target(x, *args)`` is called with ``x`` first; tensors in ``args`` become graph constants.
    ``across = (groups, inner)`` applies the op across groups instead: the last dim is split as
    ``[groups, inner]``, the op acts on the ``groups`` axis (QuaRot's cross-head Hadamard,
    ``M = H_groups ⊗ I_inner``). ``matrix`` is always the full ``[n, n]`` map of the last dim.
    """

    target: Any
    args: tuple = ()
    matrix: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))
    description: str = ""
    across: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        """What the inserted nodes compute, in eager mode (for the probe check)."""
        if self.across is None:
            return self.target(x, *self.args)
        groups, inner = self.across
        y = x.unflatten(-1, (groups, inner)).transpose(-1, -2).contiguous()
        y = self.target(y, *self.args)
        return y.transpose(-1, -2).flatten(-2)


@dataclass
class OnlineReport:
    """One online transform: where it sits, what it computes, which constants absorbed its inverse."""

    site: str  # the node whose input(s) now go through the op
    op_nodes: list[str]  # the inserted op node(s)
    transform: str
    size: int
    changes: list[ConstantChange] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "site": self.site,
            "op_nodes": self.op_nodes,
            "transform": self.transform,
            "size": self.size,
            "changes": [c.to_dict() for c in self.changes],
        }


# ---- graph surgery with meta["val"] ------------------------------------------------------------------


def _insert_op(
    qgraph: QGraph, x: fx.Node, op: OnlineOp, before: fx.Node, hint: str
) -> tuple[fx.Node, list[str]]:
    """Insert ``op`` on ``x`` (and its layout nodes); returns the output node and the inserted names."""
    args = tuple(
        qgraph.add_constant(f"{hint}_online_{i}", a, before=before) if isinstance(a, torch.Tensor) else a
        for i, a in enumerate(op.args)
    )
    made: list[fx.Node] = []
    src = x
    if op.across is not None:
        groups, inner = op.across
        src = qgraph.insert_call(aten.unflatten.int, (x, -1, [groups, inner]), before, before)
        made.append(src)
        src = qgraph.insert_call(aten.transpose.int, (src, -1, -2), before, before)
        made.append(src)
    out = qgraph.insert_call(op.target, (src, *args), before, before)
    made.append(out)
    if op.across is not None:
        out = qgraph.insert_call(aten.transpose.int, (out, -1, -2), before, before)
        made.append(out)
        out = qgraph.insert_call(aten.flatten.using_ints, (out, -2, -1), before, before)
        made.append(out)
    if not _contiguous(x):
        # Views captured downstream (e.g. sdpa output → transpose → view) rely on the traced strides;
        # an op returning a contiguous tensor would break them. Give the result x's layout.
        out = qgraph.insert_call(aten.copy.default, (x, out), before, before)
        made.append(out)
    return out, [n.name for n in made]


def _contiguous(node: fx.Node) -> bool:
    val = node.meta.get("val")
    try:
        return isinstance(val, torch.Tensor) and bool(val.is_contiguous())
    except Exception:  # a symbolic stride the shape environment cannot decide: assume not
        return False


# ---- checks -----------------------------------------------------------------------------------------


def _error(pass_name: str, node: str, op: str, reason: str, way_out: str) -> EquivalenceError:
    return EquivalenceError(pass_name, transform="online M", node=node, op=op, reason=reason, way_out=way_out)


def _check_op(op: OnlineOp, pass_name: str, site: str) -> torch.Tensor:
    """The op really computes ``x M`` (on a seeded random probe); returns M in float64."""
    m = torch.as_tensor(op.matrix).detach().to("cpu", F64)
    n = m.shape[0]
    if m.dim() != 2 or m.shape[1] != n or n == 0:
        raise _error(
            pass_name,
            site,
            op.description,
            f"M must be a square matrix, got {tuple(m.shape)}",
            "give the op's full [n, n] matrix",
        )
    probe = torch.randn(3, n, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = op.eager(probe).double()
    ref = probe.double() @ m
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    if err > OP_CHECK_RTOL:
        raise _error(
            pass_name,
            site,
            op.description,
            f"the op does not compute x M (relative error {err:.2e} on a random probe)",
            "fix the op's arguments or the matrix it claims",
        )
    return m


def is_orthogonal(m: torch.Tensor, tol: float = ORTHOGONAL_TOL) -> bool:
    """``M Mᵀ = I``, tested on seeded random rows (``x M Mᵀ = x`` for random x holds only for orthogonal
    M, almost surely): O(n²) instead of the O(n³) of forming ``M Mᵀ`` (a 1536-wide R4 Hadamard, 30×)."""
    probe = torch.randn(8, m.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64)
    return float(((probe @ m) @ m.T - probe).abs().max() / probe.abs().max()) <= tol


def _inverse_transpose(m: torch.Tensor, pass_name: str, site: str, what: str) -> torch.Tensor:
    if is_orthogonal(m):
        return m  # orthogonal: M⁻ᵀ = M
    try:
        return torch.linalg.inv(m).T
    except RuntimeError:
        raise _error(
            pass_name,
            site,
            what,
            "M is singular, so no linear can absorb its inverse",
            "use an invertible (e.g. orthogonal) map",
        ) from None


def _merge(op: OnlineOp, m: torch.Tensor, minv_t: torch.Tensor):
    """``W ↦ W M⁻ᵀ`` in float64. For orthogonal M that is ``W M``: each row of W through the op itself
    (a fast Hadamard: O(n log n) per row instead of a dense n×n product), when the op is exact in
    float64 (checked on a probe); otherwise the dense product."""
    if minv_t is m:
        probe = torch.randn(4, m.shape[0], generator=torch.Generator().manual_seed(2), dtype=F64)
        try:
            with torch.no_grad():
                fast_ok = bool(torch.allclose(op.eager(probe), probe @ m, rtol=1e-12, atol=1e-12))
        except (RuntimeError, TypeError):  # the op has no float64 path
            fast_ok = False
        if fast_ok:
            return lambda w: op.eager(w)
    return lambda w: w @ minv_t


# ---- entry points -------------------------------------------------------------------------------


def insert_online_transform(
    qgraph: QGraph, linear: str, op: OnlineOp, pass_name: str, *, recompile: bool = True
) -> OnlineReport:
    """Run ``x → x M`` online in front of ``linear`` and absorb ``M⁻ᵀ`` into its columns (float64 merge).

    Only this linear's input changes (other readers of the same tensor keep it). A weight shared with
    another reader (a tied embedding) is copied first (reported as untied). In place; raises
    :class:`EquivalenceError` (graph untouched) when the node is not a linear with a constant weight, the
    width does not match, or the op does not compute ``M``. ``recompile=False`` leaves the
    ``GraphModule`` code stale for a caller that inserts many transforms and recompiles once.
    """
    node = qgraph.node(linear)
    if not P.is_linear(node):
        raise _error(
            pass_name,
            linear,
            str(node.target),
            "not a linear with constant weights",
            "put the online transform in front of a linear",
        )
    w_node = node.args[1]
    in_features = int(qgraph.get_constant(w_node).shape[1])
    if op.size != in_features:
        raise _error(
            pass_name,
            linear,
            "aten.linear",
            f"the op is {op.size} wide, the linear reads {in_features}",
            "give a transform as wide as the linear's input",
        )
    m = _check_op(op, pass_name, linear)
    minv_t = _inverse_transpose(m, pass_name, linear, op.description)
    x = node.args[0]
    out, names = _insert_op(qgraph, x, op, node, linear)
    node.replace_input_with(x, out)
    update = ConstantUpdate(str(w_node.target), linear, "online inverse (columns)", _merge(op, m, minv_t))
    changes, _ = write_updates(qgraph, [update])
    if recompile:
        qgraph.recompile()
    return OnlineReport(linear, names, op.description, op.size, changes)


def insert_cancelling_pair(
    qgraph: QGraph,
    consumer: str,
    arg_indices: tuple[int, int],
    op: OnlineOp,
    pass_name: str,
    *,
    recompile: bool = True,
) -> OnlineReport:
    """The same orthogonal op on two inputs of ``consumer`` that it contracts along their last dim
    (``a bᵀ``, e.g. sdpa's q and k): ``(a H)(b H)ᵀ = a bᵀ``, so nothing is absorbed (QuaRot R3)."""
    node = qgraph.node(consumer)
    m = _check_op(op, pass_name, consumer)
    if not is_orthogonal(m, 1e-6):
        raise _error(
            pass_name,
            consumer,
            op.description,
            "the op is not orthogonal, so it does not cancel in a bᵀ",
            "use an orthogonal map (a Hadamard)",
        )
    names: list[str] = []
    for index in arg_indices:
        x = node.args[index]
        width = P.val_shape(x)[-1] if P.val_shape(x) else None
        if width != op.size:
            raise _error(
                pass_name,
                consumer,
                str(node.target),
                f"input {index} is {width} wide, the op {op.size}",
                "apply the map on the head dim",
            )
    for index in arg_indices:
        x = node.args[index]
        out, made = _insert_op(qgraph, x, op, node, consumer)
        node.update_arg(index, out)
        names += made
    if recompile:
        qgraph.recompile()
    return OnlineReport(consumer, names, op.description, op.size)
