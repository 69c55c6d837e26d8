"""``onnx.collapse_reshapes``: a reshape of a reshape becomes one reshape (exact).

``Reshape(Identity*(Reshape(x, s1)), s2)`` → ``Reshape(x, s2)`` when the inner reshape (and the
identities) feed nothing else and ``s2`` cannot refer to the inner shape (``allowzero = 1``, or a
constant without zeros: a 0 would copy a dim of the inner result). A reshape only relabels the same
row-major elements. A cleanup for layouts the exporter leaves in pairs, e.g. an attention output's
``[B, S, H, D]`` view and back when the lowering could not absorb the heads' merge.
"""

from __future__ import annotations

from typing import Any

import onnx

from qcompile.backends.onnx.graph_edit import Matcher, NoMatch, attr, users
from qcompile.backends.onnx.model import OnnxModel
from qcompile.backends.onnx.rewrite import OnnxRewrite
from qcompile.pipeline.contract import register_pass


def _is_reshape(node: Any) -> bool:
    return node is not None and node.op_type == "Reshape" and node.domain in ("", "ai.onnx")


def _shape_may_copy_dims(g: Matcher, node: Any) -> bool:
    """The target shape may contain a 0 that copies a dim of the input (or is not a constant)."""
    if attr(node, "allowzero", 0):
        return False
    try:
        return 0 in g.const(node.input[1]).tolist()
    except NoMatch:
        return True


def collapse_reshapes(model: onnx.ModelProto) -> int:
    """Collapse reshape-of-reshape chains (module docstring). Returns the number of reshapes removed."""
    graph = model.graph
    g = Matcher(graph)
    readers = users(graph)
    outputs = {o.name for o in graph.output}
    removed = 0
    for node in list(graph.node):
        if not _is_reshape(node) or _shape_may_copy_dims(g, node):
            continue
        chain, name = [], node.input[0]
        while name in g.producer and g.producer[name].op_type == "Identity":
            chain.append(g.producer[name])
            name = g.producer[name].input[0]
        inner = g.producer.get(name)
        if not _is_reshape(inner):
            continue
        chain.append(inner)
        if any(n.output[0] in outputs or len(readers.get(n.output[0], [])) != 1 for n in chain):
            continue
        node.input[0] = inner.input[0]
        for n in chain:
            graph.node.remove(n)
        removed += 1
    return removed


@register_pass
class CollapseReshapesPass(OnnxRewrite):
    """:func:`collapse_reshapes` as a pass over :class:`.model.OnnxModel`."""

    name = "onnx.collapse_reshapes"
    tolerance = 1e-6  # exact: the same elements in the same order
    counts = "reshape chains collapsed"

    def rewrite(self, model: OnnxModel) -> dict[str, Any]:
        return {"count": collapse_reshapes(model.proto)}
