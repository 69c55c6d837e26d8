"""Small tools for editing an ``onnx.GraphProto`` in place: who reads a value, attributes, fresh
names, topological order, pruning, and pattern look-ups (:class:`Matcher`) for the rewrite passes."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.backends.onnx.contrib import MS_DOMAIN


class NoMatch(Exception):
    """A pattern does not match here (caught by the rewrite, which then leaves the node alone)."""


class GraphEditError(RuntimeError):
    """The graph cannot be put in order (e.g. a rewrite left a value nobody produces)."""


def users(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the nodes that read it."""
    readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                readers[name].append(node)
    return readers


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (or replace) one attribute of ``node``."""
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])


def fresh_name(graph: onnx.GraphProto, stem: str) -> str:
    """``stem_k`` for the first ``k`` no value, initializer or input of ``graph`` uses."""
    taken = {v for n in graph.node for v in (*n.input, *n.output)}
    taken |= {i.name for i in graph.initializer} | {i.name for i in graph.input}
    k = 0
    while f"{stem}_{k}" in taken:
        k += 1
    return f"{stem}_{k}"


def rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node that reads ``old`` reads ``new`` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def ensure_opset(model: onnx.ModelProto, domain: str = MS_DOMAIN, version: int = 1) -> None:
    """Declare ``domain`` among the model's opset imports (a rewrite that adds the first contrib op
    must: ``onnx.checker`` refuses a node of an undeclared domain)."""
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in graph.initializer}


def toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before it is read (appended nodes moved into place)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise GraphEditError(f"toposort: {len(rest)} nodes have unproduced inputs, e.g. {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers nothing reads any more."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def drop_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    kept = [i for i in graph.initializer if i.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)


class Matcher:
    """Producer / initializer look-ups for pattern checks on a graph (build one per rewrite: it does
    not follow later edits)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.inits = initializers(graph)

    def node(self, name: str, op_type: str) -> onnx.NodeProto:
        """The node producing ``name``, which must be a ``op_type`` (else :class:`NoMatch`)."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            raise NoMatch(f"{name} is not the output of a {op_type}")
        return node

    def const(self, name: str) -> np.ndarray:
        """The value of an initializer or ``Constant`` output (else :class:`NoMatch`)."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(attr(node, "value"))
        raise NoMatch(f"{name} is not a constant")
