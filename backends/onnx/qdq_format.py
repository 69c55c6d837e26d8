"""Rewrite an exported file's MatMulNBits into standard ONNX: ``DequantizeLinear(INT4, block_size)``
→ ``MatMul`` (opset 21) — the form any ONNX runtime reads, and which ONNX Runtime fuses back into
MatMulNBits (its ``DQMatMulToMatMulNBits`` QDQ fusion, checked in tests on ORT's optimized graph).

Layout: MatMulNBits' B ``[N, G, g / 2]`` (offset-binary nibbles) becomes a signed INT4 initializer
``[K, N]`` (ONNX packs it two per byte, low nibble first) with scales ``[G, N]``, blocked along
axis 0; the padding of a ragged last block is dropped (ONNX's blocked quantization allows a short
last block). In this form the accuracy level is no longer in the file: ORT takes it from the
session config ``session.qdq_matmulnbits_accuracy_level`` (default 4); see
:data:`.accuracy.ACCURACY_LEVEL_CONFIG`. The pass ``onnx.qdq_format`` (``ExportOptions.int4_format =
"qdq"``) applies it to the in-memory model.

A packed table that a GatherBlockQuantized also reads (tied embedding) is kept for the lookup, so
that file stores the table twice.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.backends.onnx.facts import ONNX_MODEL
from qcompile.backends.onnx.model import OnnxModel
from qcompile.pipeline.contract import Pass, PassContext, PassResult, register_pass


def _unpack_b(packed: np.ndarray, k: int) -> np.ndarray:
    """uint8 ``[N, G, g/2]`` → signed int8 ``[N, K]`` (low nibble first, minus the offset 8)."""
    n = packed.shape[0]
    lo, hi = packed & 0xF, packed >> 4
    u = np.stack([lo, hi], axis=-1).reshape(n, -1)[:, :k]
    return u.astype(np.int8) - 8


def _unpack_zero_points(packed: np.ndarray, groups: int) -> np.ndarray:
    lo, hi = packed & 0xF, packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)[:, :groups].astype(np.int8) - 8


def _int4_initializer(name: str, values: np.ndarray) -> onnx.TensorProto:
    """Signed int4 values as an ONNX INT4 tensor: two's-complement nibbles, low nibble first."""
    v = (values.astype(np.int8).flatten() & 0xF).astype(np.uint8)
    if v.size % 2:
        v = np.append(v, np.uint8(0))
    raw = (v[0::2] | (v[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, onnx.TensorProto.INT4, values.shape, raw.tobytes(), raw=True)


def _rewrite(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], new_inits: list
) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("bits") != 4 or len(node.input) > 4 and any(node.input[4:]):
        return [node]  # g_idx / bias inputs: leave as is
    k, block = int(attrs["K"]), int(attrs["block_size"])
    b_name, s_name = node.input[1], node.input[2]
    q = _unpack_b(numpy_helper.to_array(inits[b_name]), k)
    scale = numpy_helper.to_array(inits[s_name])
    scale = scale.reshape(q.shape[0], -1)
    w_name, sc_name = f"{b_name}_int4_KxN", f"{s_name}_GxN"
    new_inits += [_int4_initializer(w_name, q.T.copy()), numpy_helper.from_array(scale.T.copy(), sc_name)]
    dq_inputs = [w_name, sc_name]
    if len(node.input) > 3 and node.input[3]:
        zp = _unpack_zero_points(numpy_helper.to_array(inits[node.input[3]]), scale.shape[1])
        new_inits.append(_int4_initializer(f"{node.input[3]}_GxN", zp.T.copy()))
        dq_inputs.append(f"{node.input[3]}_GxN")
    w_out = f"{node.name or b_name}_dequantized"
    dq = helper.make_node(
        "DequantizeLinear", dq_inputs, [w_out], axis=0, block_size=block, name=f"{w_out}_dq"
    )
    mm = helper.make_node("MatMul", [node.input[0], w_out], list(node.output), name=f"{w_out}_matmul")
    return [dq, mm]


def matmulnbits_to_qdq(model: onnx.ModelProto) -> int:
    """Rewrite every 4-bit MatMulNBits of ``model`` in place as DequantizeLinear(INT4) → MatMul.
    Returns the number of nodes rewritten."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    rewritten = 0
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            out = _rewrite(node, inits, new_inits)
            rewritten += out[0] is not node
            new_nodes.extend(out)
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return rewritten


def matmulnbits_file_to_qdq(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """:func:`matmulnbits_to_qdq` on a written file, saved to ``dst``."""
    model = onnx.load(str(src))
    rewritten = matmulnbits_to_qdq(model)
    onnx.save(model, str(dst))
    return rewritten


@register_pass
class QDQFormatPass(Pass):
    """:func:`matmulnbits_to_qdq` as a pass over :class:`.model.OnnxModel`: the standard-ONNX form of
    int4 weights. A change of representation (kind ``lowering``) checked like a rewrite: at the same
    accuracy level ORT fuses it back into the same kernel."""

    name = "onnx.qdq_format"
    kind = "lowering"
    requires = (ONNX_MODEL,)
    ensures = (ONNX_MODEL,)
    tolerance = 1e-5

    def run(self, ir: OnnxModel, ctx: PassContext) -> PassResult:
        count = matmulnbits_to_qdq(ir.proto)
        ir.int4_format = "qdq"
        report: dict[str, Any] = {"count": count}
        summary = f"{count} MatMulNBits → DequantizeLinear(INT4) → MatMul"
        return PassResult(ir, changed=count > 0, report=report, summary=summary)
