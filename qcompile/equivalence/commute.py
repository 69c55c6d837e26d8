"""Commute rules: which ops a transform ``T`` (acting on the last dim) may pass, all in one place.

Each rule takes a :class:`Step` (a node some of whose inputs carry ``T``) and returns the probe of the
node's output (it carries ``T`` too), or raises :class:`Refusal` with the reason and the way out.

| op                                   | passes                                                        |
|--------------------------------------|---------------------------------------------------------------|
| view/reshape/transpose/expand/slice… | any T (executed on the probe: the channel map follows)        |
| dtype casts, neg                     | any T                                                         |
| add/sub                              | any T, when every operand carries the same T (a stream)       |
| mul/div by a non-carried factor      | diagonal T: any factor (elementwise, e.g. ``silu(gate)*up``); |
|                                      | other T: only a factor constant along the channels            |
| relu                                 | diagonal T with s > 0 (positive homogeneity)                  |
| silu, gelu, tanh, sigmoid, …         | nothing                                                       |
| attention (sdpa)                     | per-head T on v only (each head's map inside its head_dim)    |
| RMSNorm without γ (whole norm)       | orthogonal T (‖xQ‖ = ‖x‖, QuaRot)                             |
| RMSNorm with γ, LayerNorm            | nothing (fuse_norms first)                                    |
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from qcompile.analysis import patterns as P
from qcompile.analysis.structure import NormSite
from qcompile.equivalence.errors import Refusal
from qcompile.equivalence.probes import ConcreteSizes, distinct_rows
from qcompile.equivalence.transforms import Transform
from qcompile.ir import QGraph

aten = torch.ops.aten

# Ops that move or relabel values without computing: run them on the probe as they are.
DATA_MOVEMENT_OPS = (
    P.VIEW_OPS
    | P.PERMUTE_OPS
    | {
        aten.slice.Tensor,
        aten.select.int,
        aten.squeeze.dims,
        aten.squeeze.default,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.cat.default,
        operator.getitem,
    }
)
SIGN_OPS = {aten.neg.default}
COMBINE_OPS = P.ADD_OPS | {aten.sub.Tensor}
SCALE_OPS = P.MUL_OPS | {aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
POSITIVE_HOMOGENEOUS_OPS = {aten.relu.default}


@dataclass
class Step:
    """One node reached by the walk: ``probes`` holds the probe of every carried node so far."""

    node: fx.Node
    probes: dict[fx.Node, Any]
    sizes: ConcreteSizes
    transform: Transform

    def carries(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.probes

    def out_shape(self) -> tuple[int, ...]:
        return self.sizes.shape(self.node)

    def rows_closed(self, probe: torch.Tensor, what: str) -> None:
        """T acts inside every last-dim row (needed where an op treats rows as units)."""
        for row in distinct_rows(probe):
            reason = self.transform.row_error(row.long())
            if reason is not None:
                raise Refusal(f"{what}, but {reason}", _WAY_OUT_LAYOUT)


_WAY_OUT_LAYOUT = "apply the map where the channels are whole (per head for attention), or keep it online"


def _layout(step: Step) -> Any:
    node = step.node
    args = step.sizes.arg(node.args, step.probes)
    kwargs = step.sizes.arg(dict(node.kwargs), step.probes)
    tensors = [
        a for a in node.all_input_nodes if not step.carries(a) and isinstance(a.meta.get("val"), torch.Tensor)
    ]
    if tensors:
        raise Refusal(
            f"it mixes the transformed value with `{tensors[0].name}`, which does not carry it",
            "make every input of this op carry the same transform, or end the region before it",
        )
    # Views and reshapes give the same values; on the probe (whose strides differ from the real
    # tensor's, e.g. after sdpa) only reshape is always allowed.
    op = aten.reshape.default if node.target in P.RESHAPE_OPS else node.target
    return op(*args, **kwargs)


def _identity(step: Step) -> Any:
    return step.probes[step.node.args[0]]


def _combine(step: Step) -> torch.Tensor:
    node, shape = step.node, step.out_shape()
    operands = list(node.args[:2])
    for other in operands:
        if not step.carries(other):
            label = f"`{other.name}`" if isinstance(other, fx.Node) else repr(other)
            raise Refusal(
                f"it adds the transformed value to {label}, which does not carry it "
                "(a source output that also feeds e.g. the residual stream)",
                "skip this group or smooth the consumers' producer instead",
            )
    a, b = (step.probes[x].broadcast_to(shape) for x in operands)
    if not torch.equal(a, b):
        raise Refusal(
            "its operands carry the transform on different channel orders",
            "make both operands carry the same T",
        )
    return a


def _scale(step: Step) -> torch.Tensor:
    node, t = step.node, step.transform
    x, factor = node.args[:2]
    if step.carries(factor) and (node.target in (aten.div.Tensor, aten.div.Scalar) or step.carries(x)):
        raise Refusal(
            "both operands (or the divisor) carry the transform; a product of transformed values is not linear",
            "end the region before this op",
        )
    if not step.carries(x):
        x, factor = factor, x
    probe = step.probes[x].broadcast_to(step.out_shape())
    if not isinstance(factor, fx.Node) or not isinstance(factor.meta.get("val"), torch.Tensor) or t.diagonal:
        return probe  # scalar factor: commutes with any linear T; diagonal T: with any elementwise factor
    fshape = factor.meta["val"].shape
    if len(fshape) == 0 or step.sizes.size(fshape[-1]) == 1:
        step.rows_closed(probe, "the factor is constant along the channels")
        return probe
    raise Refusal(
        f"the factor `{factor.name}` varies along the channels; only a diagonal map commutes with it",
        "smooth here with a diagonal transform, or apply the rotation where no elementwise product follows",
    )


def _positive_homogeneous(step: Step) -> Any:
    if step.transform.positive:
        return step.probes[step.node.args[0]]
    raise Refusal(
        f"{op_label(step.node)} commutes only with a diagonal map with every s_j > 0 (relu(x/s) = relu(x)/s)",
        "use positive scales, or end the region before the activation",
    )


def _nonlinear(step: Step) -> Any:
    raise Refusal(
        f"{op_label(step.node)} is nonlinear and does not commute with {step.transform}",
        "end the region before the activation (skip this group, or keep the transform online)",
    )


def _attention(step: Step) -> Any:
    node, t = step.node, step.transform
    q, k, v = node.args[:3]
    carried_qk = [a.name for a in node.all_input_nodes if step.carries(a) and a is not v]
    if carried_qk or not step.carries(v):
        raise Refusal(
            "only the value input may carry the transform (the scores softmax(q·kᵀ) would change)",
            "transform v only (v→o region), or keep the map online",
        )
    probe = step.probes[v]
    if t.block is None or probe.shape[-1] % t.block:
        raise Refusal(
            "attention mixes tokens per head, so only a map inside each head (per-head, head_dim blocks) passes",
            "use a per-head map (R2: one head_dim × head_dim block per head) or a diagonal",
        )
    step.rows_closed(probe, "attention treats each head's channels as a unit")
    if not torch.equal(probe, probe[..., :1, :].expand_as(probe)):
        raise Refusal("the value's channel map varies over tokens", _WAY_OUT_LAYOUT)
    out_shape = step.out_shape() if isinstance(node.meta.get("val"), torch.Tensor) else step.sizes.shape(v)
    heads_q, heads_v = out_shape[-3], probe.shape[-3]
    if heads_q != heads_v:  # enable_gqa: query head h reads KV head h // (heads_q / heads_v)
        probe = probe.repeat_interleave(heads_q // heads_v, dim=-3)
    out = probe[..., :1, :].expand(*out_shape).contiguous()
    if P.is_op(node, {aten._scaled_dot_product_flash_attention_for_cpu.default}):
        return (out, None)
    return out


def op_label(node: fx.Node) -> str:
    """``aten.add.Tensor`` style label for messages."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if isinstance(node.target, torch._ops.OpOverload):
            return f"aten.{node.target._opname}.{node.target._overloadname}"
        return name
    return node.op


RULES: dict[Any, Callable[[Step], Any]] = {
    **{op: _layout for op in DATA_MOVEMENT_OPS},
    **{op: _identity for op in P.CAST_OPS | SIGN_OPS},
    **{op: _combine for op in COMBINE_OPS},
    **{op: _scale for op in SCALE_OPS},
    **{op: _positive_homogeneous for op in POSITIVE_HOMOGENEOUS_OPS},
    **{op: _nonlinear for op in P.ACTIVATION_OPS if op not in POSITIVE_HOMOGENEOUS_OPS},
    **{op: _attention for op in P.SDPA_OPS},
}


def pass_op(step: Step) -> Any:
    """The probe of ``step.node``'s output, or :class:`Refusal` if the op does not commute with T."""
    rule = RULES.get(step.node.target) if step.node.op == "call_function" else None
    if rule is None:
        if step.node.op == "output":
            raise Refusal("the transformed value is a graph output", "end the region before the output")
        raise Refusal(
            f"{op_label(step.node)} is not known to commute with {step.transform}",
            "end the region before this op, or add a commute rule for it in qcompile/equivalence/commute.py",
        )
    return rule(step)


# ---- norms (as whole units) ------------------------------------------------------------------------


def norm_is_weightless(qgraph: QGraph, norm: NormSite) -> bool:
    """No γ (or an all-ones γ) and no β: what fuse_norms leaves behind."""
    if norm.bias is not None and bool(qgraph.get_constant(norm.bias).ne(0).any()):
        return False
    return norm.weight is None or bool(qgraph.get_constant(norm.weight).eq(1).all())


def pass_norm(
    qgraph: QGraph, norm: NormSite, transform: Transform, probe: torch.Tensor, step: Step
) -> torch.Tensor:
    """A norm reached on its input: its output carries T, or :class:`Refusal`."""
    if norm.kind != "rms_norm":
        raise Refusal(
            f"LayerNorm `{norm.output}` subtracts the row mean and scales by γ; it commutes with no {transform}",
            "run fuse_norms first (it centres the stream and turns LayerNorm into a weightless RMSNorm)",
        )
    if not transform.orthogonal:
        raise Refusal(
            f"RMSNorm `{norm.output}` divides each row by its RMS, which {transform} changes",
            "absorb the transform at the norm's output instead (region_for_norm), not across it",
        )
    if not norm_is_weightless(qgraph, norm):
        raise Refusal(
            f"RMSNorm `{norm.output}` has γ `{norm.weight}`, which does not commute with an orthogonal map",
            "run fuse_norms first (it folds γ into the readers and leaves a weightless RMSNorm)",
        )
    step.rows_closed(probe, f"RMSNorm `{norm.output}` normalises each row")
    return probe
