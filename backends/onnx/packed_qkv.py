"""``onnx.pack_qkv_into_gqa``: each ``GroupQueryAttention`` with RoPE inside (``onnx.fuse_rotary``)
reads the packed q/k/v projection (``onnx.pack_projections``) directly — GQA's packed-QKV form, with
``key``/``value`` empty — when q, k and v are the three outputs of one ``Split`` ([heads·D, kv·D,
kv·D]), v through layout ops that cancel. Exact (the same numbers reach the kernel); drops a Split
and v's reshapes per layer."""

from __future__ import annotations

from typing import Any

import onnx

from qcompile.backends.onnx.facts import ONNX_DECODE_STEP
from qcompile.backends.onnx.graph_edit import Matcher, NoMatch, attr, prune
from qcompile.backends.onnx.model import OnnxModel
from qcompile.backends.onnx.rewrite import OnnxRewrite
from qcompile.pipeline.contract import register_pass


def _layout_identity_source(g: Matcher, value: str, width: int) -> str:
    """Follow ``value`` back through Reshape / Transpose nodes that together change nothing (the
    Transposes compose to the identity, the last Reshape restores ``[B, S, width]`` with
    ``[0, 0, width]``) and return the tensor they start from."""
    last = g.node(value, "Reshape")
    if g.const(last.input[1]).tolist() != [0, 0, width]:
        raise NoMatch("final reshape is not [0, 0, width]")
    perm = list(range(4))
    name = last.input[0]
    while name in g.producer and g.producer[name].op_type in ("Reshape", "Transpose"):
        node = g.producer[name]
        if node.op_type == "Transpose":
            p = list(attr(node, "perm"))
            if len(p) != 4:
                raise NoMatch("transpose rank")
            perm = [perm[i] for i in p]
        name = node.input[0]
    if perm != list(range(4)):
        raise NoMatch("transposes do not cancel")
    return name


def _packed_split(g: Matcher, node: Any) -> Any:
    """The ``Split`` whose three outputs are exactly this GQA node's q, k and v."""
    split = g.producer.get(node.input[0])
    if split is None or split.op_type != "Split" or len(split.output) != 3:
        raise NoMatch("q is not a 3-way split")
    sizes = g.const(split.input[1]).tolist() if len(split.input) > 1 else None
    heads, kv_heads = int(attr(node, "num_heads")), int(attr(node, "kv_num_heads"))
    if not sizes or len(sizes) != 3 or sizes[0] * kv_heads != sizes[1] * heads or sizes[1] != sizes[2]:
        raise NoMatch("split sizes")
    if attr(split, "axis", 0) not in (-1, 2):
        raise NoMatch("split axis")
    if split.output[0] != node.input[0] or split.output[1] != node.input[1]:
        raise NoMatch("q/k are not split outputs 0/1")
    if _layout_identity_source(g, node.input[2], sizes[2]) != split.output[2]:
        raise NoMatch("v is not split output 2")
    return split


def pack_qkv_into_gqa(model: onnx.ModelProto) -> int:
    """Feed each rotary ``GroupQueryAttention`` its packed q/k/v (module docstring). Returns how many
    GQA nodes were changed."""
    graph = model.graph
    g = Matcher(graph)
    changed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        if not attr(node, "do_rotary", 0) or len(node.input) < 3 or not node.input[1] or not node.input[2]:
            continue
        try:
            split = _packed_split(g, node)
        except NoMatch:
            continue
        node.input[0] = split.input[0]
        node.input[1] = ""
        node.input[2] = ""
        changed += 1
    if changed:
        prune(graph)
    return changed


@register_pass
class PackQKVIntoGQAPass(OnnxRewrite):
    """:func:`pack_qkv_into_gqa` as a pass over :class:`.model.OnnxModel`."""

    name = "onnx.pack_qkv_into_gqa"
    requires = (ONNX_DECODE_STEP,)
    tolerance = 1e-6  # exact: the kernel reads the same numbers
    counts = "GroupQueryAttention nodes reading the packed q/k/v"

    def rewrite(self, model: OnnxModel) -> dict[str, Any]:
        return {"count": pack_qkv_into_gqa(model.proto)}
