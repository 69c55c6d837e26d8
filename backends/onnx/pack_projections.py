"""``onnx.pack_projections``: linears that read the same activation with the same kernel settings
(q/k/v; gate/up) become one ``MatMulNBits`` (or float ``MatMul``) over the concatenated weights and
a ``Split``: one activation quantization and one kernel call instead of three (SmolLM2, W4A16: 210 →
120 layer kernels, 4.2 → 3.3 ms per step alone). Exact: every output column is the same dot product
over the same blocks."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.backends.onnx.graph_edit import attr, drop_initializers, fresh_name, initializers, toposort
from qcompile.backends.onnx.model import OnnxModel
from qcompile.backends.onnx.rewrite import OnnxRewrite
from qcompile.pipeline.contract import register_pass


def _nbits_key(node: onnx.NodeProto, inits: dict[str, Any]) -> tuple | None:
    """What must agree for MatMulNBits nodes to share one kernel call (None: not packable)."""
    weights = [n for n in node.input[1:] if n]
    if any(n not in inits for n in weights):
        return None
    present = tuple(bool(n) for n in node.input[1:])
    attrs = tuple(sorted((a.name, str(attr(node, a.name))) for a in node.attribute if a.name != "N"))
    if len(node.input) > 4 and any(node.input[4:]):  # g_idx / bias: not handled
        return None
    return ("MatMulNBits", node.input[0], present, attrs)


def _matmul_key(node: onnx.NodeProto, inits: dict[str, Any]) -> tuple | None:
    b = inits.get(node.input[1])
    if b is None or len(b.dims) != 2:
        return None
    return ("MatMul", node.input[0], b.dims[0], b.data_type)


def _groups(graph: onnx.GraphProto) -> list[list[onnx.NodeProto]]:
    """Packable linears by what they share, in graph order (groups of two or more)."""
    inits = initializers(graph)
    groups: dict[tuple, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        key = None
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            key = _nbits_key(node, inits)
        elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            key = _matmul_key(node, inits)
        if key is not None:
            groups[key].append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def _packed_node(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], out: str) -> tuple[Any, list[int]]:
    """One kernel over the concatenated weights of ``nodes`` and the widths of their outputs."""
    inits = initializers(graph)
    first = nodes[0]
    if first.op_type == "MatMulNBits":
        widths = [int(attr(n, "N")) for n in nodes]
        new_inputs = [first.input[0]]
        for slot in range(1, len(first.input)):
            if not first.input[slot]:
                new_inputs.append("")
                continue
            arrays = [numpy_helper.to_array(inits[n.input[slot]]) for n in nodes]
            name = fresh_name(graph, f"{first.input[slot]}_merged")
            graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=0), name))
            new_inputs.append(name)
        packed = onnx.helper.make_node("MatMulNBits", new_inputs, [out], name=out, domain="com.microsoft")
        packed.attribute.extend(a for a in first.attribute if a.name != "N")
        packed.attribute.append(onnx.helper.make_attribute("N", sum(widths)))
        return packed, widths
    arrays = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
    name = fresh_name(graph, f"{first.input[1]}_merged")
    graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), name))
    return onnx.helper.make_node("MatMul", [first.input[0], name], [out], name=out), [
        a.shape[1] for a in arrays
    ]


def pack_projections(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """Merge linears that read one activation (module docstring). Returns ``(op_type, k)`` per merge."""
    graph = model.graph
    shared = collections.Counter(name for n in graph.node for name in n.input)
    merged: list[tuple[str, int]] = []
    unread: set[str] = set()
    for nodes in _groups(graph):
        first = nodes[0]
        out = fresh_name(graph, f"packed_{first.name or 'linear'}")
        packed, widths = _packed_node(graph, nodes, out)
        sizes = fresh_name(graph, f"{out}_sizes")
        graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), sizes))
        split = onnx.helper.make_node(
            "Split", [out, sizes], [n.output[0] for n in nodes], axis=-1, name=f"{out}_split"
        )
        at = list(graph.node).index(first)
        for node in nodes:
            graph.node.remove(node)
            unread |= {slot for slot in node.input[1:] if slot and shared[slot] == 1}
        graph.node.insert(at, split)
        graph.node.insert(at, packed)
        merged.append((first.op_type, len(nodes)))
    if unread:
        drop_initializers(graph, unread)
    toposort(graph)
    return merged


@register_pass
class PackProjectionsPass(OnnxRewrite):
    """The module docstring, as a pass over :class:`.model.OnnxModel`."""

    name = "onnx.pack_projections"
    tolerance = 1e-6  # exact: the same dot products over the same blocks
    counts = "packed kernels (q/k/v, gate/up)"

    def rewrite(self, model: OnnxModel) -> dict[str, Any]:
        merged = pack_projections(model.proto)
        sizes = collections.Counter(f"{k}-way {op}" for op, k in merged)
        return {"count": len(merged), "packed": dict(sorted(sizes.items())), "merges": merged}
