"""``onnx.share_kv_buffer``: the past length of a decode step becomes an input.

The past length becomes ``past_sequence_length`` (int64 ``[1]``) instead of the shape of
``past_key_values.*``. A runtime may then pass a fixed-size buffer ``[batch, kv_heads, max_len,
head_dim]`` as both ``past_key_values.i.*`` and ``present.i.*`` (ORT IOBinding, the same OrtValue):
``GroupQueryAttention`` sees the same pointer and writes the new rows in place instead of copying the
whole past into a fresh present every step — on SmolLM2 at a 512-token context that copy was ~3.6 ms
of a step (30 layers, 2 threads; BENCHMARKS.md). Called with an exact-length past and
``past_sequence_length = past.shape[2]`` the model computes what it did (present = past ++ new):
exact. Needs fused attention: only ``GroupQueryAttention`` and ``Shape`` may read the cache.
"""

from __future__ import annotations

from typing import Any

import onnx

from qcompile.backends.onnx.facts import KV_CACHE_IN_ATTENTION
from qcompile.backends.onnx.graph_edit import attr, fresh_name, rename_input, toposort, users
from qcompile.backends.onnx.model import PAST_LENGTH_INPUT, PAST_PREFIX, OnnxModel
from qcompile.backends.onnx.rewrite import OnnxRewrite
from qcompile.errors import PassError
from qcompile.pipeline.contract import register_pass

NAME = "onnx.share_kv_buffer"


def share_kv_buffer(model: onnx.ModelProto) -> int:
    """Make the past length an input (module docstring). Returns the number of ``Shape`` reads of the
    cache length replaced; 0 when the model already has the input. Raises :class:`PassError` (before
    changing anything) when something else reads the cache."""
    graph = model.graph
    if any(i.name == PAST_LENGTH_INPUT for i in graph.input):
        return 0
    past = [i.name for i in graph.input if i.name.startswith(PAST_PREFIX)]
    if not past:
        raise PassError(NAME, "the model has no past_key_values.* inputs (not a decode step)")
    reads = _length_reads(graph, past)
    for name, node, start, end in reads:
        _splice_length(graph, name, node, start, end)
    for _, node, _, _ in reads:
        graph.node.remove(node)
    graph.input.append(onnx.helper.make_tensor_value_info(PAST_LENGTH_INPUT, onnx.TensorProto.INT64, [1]))
    for out in graph.output:  # past + new when the cache is concatenated, the buffer's length when shared
        if out.name.startswith("present.") and len(out.type.tensor_type.shape.dim) == 4:
            dim = out.type.tensor_type.shape.dim[2]
            dim.Clear()
            dim.dim_param = "present_sequence"
    toposort(graph)
    return len(reads)


def _length_reads(graph: onnx.GraphProto, past: list[str]) -> list[tuple[str, Any, int, int]]:
    """Every ``Shape`` read of a cache length: (cache input, node, start, end), all checked first."""
    readers = users(graph)
    reads = []
    for name in past:
        for node in readers.get(name, []):
            if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
                if list(node.input).index(name) not in (3, 4):
                    raise PassError(NAME, f"reads {name} as a non-cache input", node.name)
                continue
            if node.op_type != "Shape":
                raise PassError(
                    NAME,
                    f"{node.op_type} reads the cache {name}; only GroupQueryAttention and Shape may "
                    "(run fuse_attention before onnx.export, or disable onnx.share_kv_buffer)",
                    node.name,
                )
            start, end = attr(node, "start", 0), attr(node, "end", None)
            start = start + 4 if start < 0 else start
            end = 4 if end is None else (end + 4 if end < 0 else min(end, 4))
            if start <= 2 < end:  # reads the length; batch / heads / head_dim the buffer has too
                reads.append((name, node, start, end))
    return reads


def _splice_length(graph: onnx.GraphProto, name: str, node: Any, start: int, end: int) -> None:
    """Replace one shape read by the length input (a wider read gets the length spliced in)."""
    if (start, end) == (2, 3):
        rename_input(graph, node.output[0], PAST_LENGTH_INPUT)
        return
    parts = []
    if start < 2:
        parts.append(fresh_name(graph, "kv_shape_head"))
        graph.node.append(onnx.helper.make_node("Shape", [name], [parts[-1]], start=start, end=2))
    parts.append(PAST_LENGTH_INPUT)
    if end > 3:
        parts.append(fresh_name(graph, "kv_shape_tail"))
        graph.node.append(onnx.helper.make_node("Shape", [name], [parts[-1]], start=3, end=end))
    graph.node.append(
        onnx.helper.make_node("Concat", parts, [node.output[0]], axis=0, name=node.name + "_kvlen")
    )


@register_pass
class ShareKVBufferPass(OnnxRewrite):
    """The module docstring, as a pass over :class:`.model.OnnxModel`."""

    name = NAME
    requires = (KV_CACHE_IN_ATTENTION,)
    tolerance = 1e-6  # exact: the same kernels read the same values
    counts = "cache-shape reads replaced by the past_sequence_length input"

    def rewrite(self, model: OnnxModel) -> dict[str, Any]:
        added = PAST_LENGTH_INPUT not in model.input_names
        return {"count": share_kv_buffer(model.proto), "input_added": added}

    def changed(self, report: dict[str, Any]) -> bool:
        return report["input_added"]
