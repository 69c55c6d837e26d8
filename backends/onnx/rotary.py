"""``onnx.fuse_rotary`` (decode steps): RoPE moves into ``GroupQueryAttention``.

Each layer's RoPE becomes ``do_rotary=1`` with a cos/sin cache computed in float64 from the graph's
own ``inv_freq``, and GQA's length inputs are read off ``input_ids`` so one computation serves every
layer. Only a RoPE that matches transformers' ``rotate_half`` exactly is moved, and only for head
sizes that are multiples of 16 (ORT's kernel). Rounding-level change: the float64-computed cache
against the graph's float32 cos/sin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.backends.onnx.facts import ONNX_DECODE_STEP
from qcompile.backends.onnx.graph_edit import Matcher, NoMatch, attr, fresh_name, prune, users
from qcompile.backends.onnx.model import OnnxModel
from qcompile.backends.onnx.rewrite import OnnxRewrite
from qcompile.pipeline.contract import register_pass


def _match_rope(g: Matcher, value: str, head_dim: int) -> tuple[str, str, str, str]:
    """``value`` (GQA's q or k input) = ``Reshape(Transpose(rope(Transpose(Reshape(base)))))`` with
    ``rope(x) = x·cos + cat(-x[..., D/2:], x[..., :D/2])·sin`` (transformers' ``rotate_half``).
    Returns ``(base, cos, sin, rotated)``: the projection's ``[B, S, heads·D]`` output, the cos/sin
    tensors and the rotated BHSD tensor."""
    out = g.node(value, "Reshape")
    t_out = g.node(out.input[0], "Transpose")
    add = g.node(t_out.input[0], "Add")
    if attr(t_out, "perm") != [0, 2, 1, 3]:
        raise NoMatch("transpose perm")
    muls = [g.node(i, "Mul") for i in add.input]
    x = None
    for mul in muls:  # the x·cos term: one input is the BHSD activation (a Transpose)
        for i, other in ((0, 1), (1, 0)):
            src = g.producer.get(mul.input[i])
            if src is not None and src.op_type == "Transpose" and attr(src, "perm") == [0, 2, 1, 3]:
                x, cos, cos_mul = src, mul.input[other], mul
    if x is None:
        raise NoMatch("no x·cos term")
    sin_mul = next(m for m in muls if m is not cos_mul)
    cat_name, sin = None, None
    for i, other in ((0, 1), (1, 0)):
        src = g.producer.get(sin_mul.input[i])
        if src is not None and src.op_type == "Concat":
            cat_name, sin = sin_mul.input[i], sin_mul.input[other]
    if cat_name is None:
        raise NoMatch("no rotate_half term")
    _check_rotate_half(g, g.node(cat_name, "Concat"), x, head_dim)
    view = g.node(x.input[0], "Reshape")
    return view.input[0], cos, sin, add.output[0]


def _check_rotate_half(g: Matcher, cat: Any, x: Any, head_dim: int) -> None:
    """``cat`` is ``cat(-x[..., D/2:], x[..., :D/2])`` over the last axis."""
    if attr(cat, "axis") not in (-1, 3) or len(cat.input) != 2:
        raise NoMatch("rotate_half concat axis")
    neg = g.node(cat.input[0], "Neg")
    hi, lo = g.node(neg.input[0], "Slice"), g.node(cat.input[1], "Slice")
    half = head_dim // 2
    for sl, (start, end) in ((hi, (half, None)), (lo, (0, half))):
        if sl.input[0] != x.output[0]:
            raise NoMatch("rotate_half slices another tensor")
        starts, ends = g.const(sl.input[1]), g.const(sl.input[2])
        axes = g.const(sl.input[3]) if len(sl.input) > 3 and sl.input[3] else np.array([-1])
        steps = g.const(sl.input[4]) if len(sl.input) > 4 and sl.input[4] else np.array([1])
        if int(axes[0]) not in (-1, 3) or int(steps[0]) != 1 or int(starts[0]) != start:
            raise NoMatch("rotate_half slice bounds")
        if (end is None and int(ends[0]) < head_dim) or (end is not None and int(ends[0]) != end):
            raise NoMatch("rotate_half slice bounds")


def _match_cos_sin(g: Matcher, cos: str, sin: str, head_dim: int) -> np.ndarray:
    """``cos``/``sin`` = ``Unsqueeze(Cos|Sin(cat(f, f)))``, ``f = positions · inv_freq``, positions
    = ``past_len + Range(0, S, 1)``. Returns ``inv_freq`` (``[D/2]``)."""
    cat_names = []
    for name, fn in ((cos, "Cos"), (sin, "Sin")):
        unsq = g.node(name, "Unsqueeze")
        cat_names.append(g.node(unsq.input[0], fn).input[0])
    if cat_names[0] != cat_names[1]:
        raise NoMatch("cos and sin of different angles")
    cat = g.node(cat_names[0], "Concat")
    if len(cat.input) != 2 or cat.input[0] != cat.input[1] or attr(cat, "axis") not in (-1, 2):
        raise NoMatch("angles are not cat(f, f)")
    mul = g.node(cat.input[0], "Mul")
    inv_freq, positions = None, None
    for i, other in ((0, 1), (1, 0)):
        try:
            arr = g.const(mul.input[i])
        except NoMatch:
            continue
        if arr.size == head_dim // 2:
            inv_freq, positions = arr.reshape(-1).astype(np.float64), mul.input[other]
    if inv_freq is None:
        raise NoMatch("no inv_freq constant")
    pos = g.node(g.node(positions, "Cast").input[0], "Unsqueeze")
    add = g.node(pos.input[0], "Add")
    rng = next(
        (g.producer[i] for i in add.input if g.producer.get(i) and g.producer[i].op_type == "Range"), None
    )
    if rng is None or int(g.const(rng.input[0])) != 0 or int(g.const(rng.input[2])) != 1:
        raise NoMatch("positions are not past + arange(S)")
    return inv_freq


def _match_layer(g: Matcher, node: Any) -> tuple[str, str, str, str, np.ndarray]:
    """(q, k, rotated q, rotated k, inv_freq) of one GQA node whose q and k RoPE match."""
    heads = int(attr(node, "num_heads"))
    shape = g.const(g.node(node.input[0], "Reshape").input[1])
    head_dim = int(shape[-1]) // heads
    if head_dim % 16:  # ORT's GQA: "head_size shall be a multiple of 16" with do_rotary
        raise NoMatch(f"head_dim {head_dim} is not a multiple of 16")
    q, cos_q, sin_q, q_rot = _match_rope(g, node.input[0], head_dim)
    k, cos_k, sin_k, k_rot = _match_rope(g, node.input[1], head_dim)
    if (cos_q, sin_q) != (cos_k, sin_k):
        raise NoMatch("q and k rotated by different angles")
    return q, k, q_rot, k_rot, _match_cos_sin(g, cos_q, sin_q, head_dim)


_BHSD_TO_BSH = {(0, 1): (0, 1), (2, 3): (1, 2)}


def _reroute_lengths(graph: onnx.GraphProto, readers: dict, rotated: str, base: str) -> None:
    """GQA's length inputs read batch and sequence off the rotated BHSD tensor: read them off
    ``base`` ([B, S, …]) instead, so the RoPE nodes die."""
    for reader in readers.get(rotated, []):
        if reader.op_type != "Shape":
            continue
        span = _BHSD_TO_BSH.get((attr(reader, "start", 0), attr(reader, "end", None)))
        if span is not None:  # batch stays dim 0; the sequence moves from dim 2 to 1
            reader.input[0] = base
            del reader.attribute[:]
            reader.attribute.extend(
                [helper.make_attribute("start", span[0]), helper.make_attribute("end", span[1])]
            )


def fuse_rotary(model: onnx.ModelProto, max_positions: int) -> int:
    """Move each layer's RoPE into its ``GroupQueryAttention`` (module docstring) with a shared
    cos/sin cache of ``max_positions`` rows: q and k go to GQA straight from their projections, ~20
    nodes a layer fewer. GQA rotates the query row ``s`` at position ``past + s`` — the positions the
    matched graph computes. Returns how many GQA nodes were changed; a layer whose RoPE does not
    match exactly is left as it is."""
    graph = model.graph
    g = Matcher(graph)
    readers = users(graph)
    caches: dict[bytes, tuple[str, str]] = {}
    ids = "input_ids" if any(i.name == "input_ids" for i in graph.input) else None
    fused = 0
    for node in list(graph.node):
        if (
            node.op_type != "GroupQueryAttention"
            or node.domain != "com.microsoft"
            or attr(node, "do_rotary", 0)
        ):
            continue
        if len(node.input) > 7 and any(node.input[7:10]):
            continue
        try:
            q, k, q_rot, k_rot, inv_freq = _match_layer(g, node)
        except NoMatch:
            continue
        key = inv_freq.tobytes()
        if key not in caches:
            angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
            names = (fresh_name(graph, "rope_cos_cache"), fresh_name(graph, "rope_sin_cache"))
            graph.initializer.append(numpy_helper.from_array(np.cos(angles).astype(np.float32), names[0]))
            graph.initializer.append(numpy_helper.from_array(np.sin(angles).astype(np.float32), names[1]))
            caches[key] = names
        inputs = list(node.input) + [""] * (17 - len(node.input))
        inputs[0], inputs[1] = q, k
        inputs[7], inputs[8] = caches[key]
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend(
            [helper.make_attribute("do_rotary", 1), helper.make_attribute("rotary_interleaved", 0)]
        )
        # input_ids is [B, S] in every layer, so ORT's CSE shares one length computation
        _reroute_lengths(graph, readers, q_rot, ids or q)
        _reroute_lengths(graph, readers, k_rot, ids or k)
        fused += 1
    if fused:
        prune(graph)
    return fused


@register_pass
class FuseRotaryPass(OnnxRewrite):
    """:func:`fuse_rotary` as a pass over :class:`.model.OnnxModel` (``max_positions``: the cos/sin
    cache's rows, the model's ``max_position_embeddings``; None leaves RoPE where it is)."""

    name = "onnx.fuse_rotary"
    requires = (ONNX_DECODE_STEP,)
    # cos/sin from float64 angles instead of the graph's float32 ones; measured (EquivalenceCheck, a
    # random cached step): tiny Llama 2.4e-7, SmolLM2 W4A16 3.3e-5
    tolerance = 1e-4
    counts = "GroupQueryAttention nodes with RoPE inside (do_rotary)"

    @dataclass
    class Options:
        max_positions: int | None = None  # rows of the cos/sin cache (max_position_embeddings)

    def rewrite(self, model: OnnxModel) -> dict[str, Any]:
        if not self.options.max_positions:
            return {"count": 0, "skipped": "no max_positions (the model's max_position_embeddings)"}
        count = fuse_rotary(model.proto, self.options.max_positions)
        return {"count": count, "max_positions": self.options.max_positions}
