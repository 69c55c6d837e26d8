"""RMSNorm in the forms ONNX Runtime's CPU kernels fuse.

- ``onnx.rms_norm_div``: ``x · Reciprocal(Sqrt(v))`` (what ``aten.rsqrt`` exports to) becomes
  ``x / Sqrt(v)``, the form ORT's ``SimplifiedLayerNormFusion`` matches, so an RMSNorm without a
  residual Add before it (the first) runs as one ``SimplifiedLayerNormalization`` kernel at session
  load while the model keeps only standard ops (``onnx.checker`` rejects that contrib op in the
  default domain at opset 21);
- ``onnx.fuse_skip_rms_norm``: every residual ``Add`` + RMSNorm in that Div form becomes one
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (its 4th output is the sum).

Rounding-level changes: the fused kernels sum in their own order.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

from qcompile.backends.onnx.graph_edit import Matcher, NoMatch, attr, ensure_opset, toposort, users
from qcompile.backends.onnx.model import OnnxModel
from qcompile.backends.onnx.rewrite import OnnxRewrite
from qcompile.pipeline.contract import register_pass


def rms_norm_div(model: onnx.ModelProto) -> int:
    """``Mul(x, Reciprocal(Sqrt(v)))`` → ``Div(x, Sqrt(v))``. Returns how many."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers = users(graph)
    outputs = {o.name for o in graph.output}
    removed = []
    for node in graph.node:
        if node.op_type != "Reciprocal" or node.output[0] in outputs:
            continue
        sqrt = producer.get(node.input[0])
        consumers = readers.get(node.output[0], [])
        if sqrt is None or sqrt.op_type != "Sqrt" or not consumers:
            continue
        if any(u.op_type != "Mul" or list(u.input).count(node.output[0]) != 1 for u in consumers):
            continue
        for mul in consumers:
            other = next(name for name in mul.input if name != node.output[0])
            mul.op_type = "Div"
            del mul.input[:]
            mul.input.extend([other, sqrt.output[0]])
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    return len(removed)


def _match_skip_norm(g: Matcher, div: Any, readers: dict, outputs: set[str]) -> tuple[Any, ...]:
    """``Div(add, Sqrt(ReduceMean(Pow(add, 2)) + eps)) · gamma`` → (add, mul, gamma, eps, private nodes)."""
    add = g.node(div.input[0], "Add")
    sqrt = g.node(div.input[1], "Sqrt")
    eps_add = g.node(sqrt.input[0], "Add")
    mean_name = next(i for i in eps_add.input if i in g.producer and g.producer[i].op_type == "ReduceMean")
    eps = float(g.const(next(i for i in eps_add.input if i != mean_name)).reshape(-1)[0])
    mean = g.producer[mean_name]
    axes = g.const(mean.input[1]).tolist() if len(mean.input) > 1 else attr(mean, "axes")
    if list(axes) not in ([-1], [2]) or attr(mean, "keepdims", 1) != 1:
        raise NoMatch("reduce axes")
    power = g.node(mean.input[0], "Pow")
    if power.input[0] != add.output[0] or float(g.const(power.input[1]).reshape(-1)[0]) != 2.0:
        raise NoMatch("not mean(sum²)")
    muls = readers.get(div.output[0], [])
    if len(muls) != 1 or muls[0].op_type != "Mul":
        raise NoMatch("no gamma multiply")
    mul = muls[0]
    gamma = next(i for i in mul.input if i != div.output[0])
    if g.const(gamma).ndim != 1:
        raise NoMatch("gamma is not a vector")
    private = (power, mean, eps_add, sqrt, div)
    for node in private[:-1]:
        if any(u not in private for u in readers.get(node.output[0], [])) or node.output[0] in outputs:
            raise NoMatch("intermediate read elsewhere")
    return add, mul, gamma, eps, private


def fuse_skip_rms_norm(model: onnx.ModelProto) -> int:
    """``Add(x, y)`` followed by an RMSNorm of the sum in the Div form (:func:`rms_norm_div`) →
    ``SkipSimplifiedLayerNormalization(x, y, gamma)``: one kernel and one pass over the activation
    instead of seven nodes. Norms without a constant ``gamma`` vector are left to ORT's own fusion.
    Returns how many were fused."""
    graph = model.graph
    g = Matcher(graph)
    readers = users(graph)
    outputs = {o.name for o in graph.output}
    fused, dead = 0, []
    for div in [n for n in graph.node if n.op_type == "Div"]:
        try:
            add, mul, gamma, eps, private = _match_skip_norm(g, div, readers, outputs)
        except (NoMatch, StopIteration):
            continue
        skip = helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [add.input[0], add.input[1], gamma],
            [mul.output[0], "", "", add.output[0]],
            name=f"{add.name or add.output[0]}_skip_rms",
            domain="com.microsoft",
            epsilon=eps,
        )
        graph.node.insert(list(graph.node).index(add), skip)
        dead += [add, *private, mul]
        fused += 1
    for node in dead:
        graph.node.remove(node)
    if fused:
        ensure_opset(model)
        toposort(graph)
    return fused


# Max relative output error measured by the EquivalenceCheck instrument (MatMulNBits at accuracy level
# 1, a random cached step): tiny Llama 2.4e-7 / 3.0e-7; SmolLM2 W4A16 with an int8 head 1.5e-5
# (rms_norm_div) / 4.0e-5 (fuse_skip_rms_norm). The bound leaves 2.5× of room above the larger.
ROUNDING_TOLERANCE = 1e-4


@register_pass
class RMSNormDivPass(OnnxRewrite):
    """:func:`rms_norm_div` as a pass over :class:`.model.OnnxModel`."""

    name = "onnx.rms_norm_div"
    tolerance = ROUNDING_TOLERANCE  # x / s instead of x · (1 / s): one rounding fewer or more
    counts = "RMSNorms in ORT's fusable Div form"

    def rewrite(self, model: OnnxModel) -> dict[str, Any]:
        return {"count": rms_norm_div(model.proto)}


@register_pass
class FuseSkipRMSNormPass(OnnxRewrite):
    """:func:`fuse_skip_rms_norm` as a pass over :class:`.model.OnnxModel`."""

    name = "onnx.fuse_skip_rms_norm"
    tolerance = ROUNDING_TOLERANCE  # the fused kernel's own summation order
    counts = "residual Add + RMSNorm → SkipSimplifiedLayerNormalization"

    def rewrite(self, model: OnnxModel) -> dict[str, Any]:
        return {"count": fuse_skip_rms_norm(model.proto)}
