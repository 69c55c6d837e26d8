"""Rewrites of a written ONNX file (decode steps above all) for ONNX Runtime's CPU kernels.

The exporter writes what the QGraph computes; these rewrites change how ORT computes it, not what
(each is checked against the file before it in tests/test_onnx_optimize.py). They run on the
``onnx`` protobuf after :func:`export_decoder` has written the file (``ExportOptions.share_kv_buffer``,
``pack_projections``, ``rms_norm_div``, ``fuse_rotary``); each returns what it changed so the
export summary can say.

- :func:`share_kv_buffer` — the past length becomes an input, ``past_sequence_length`` (int64
  ``[1]``), instead of the shape of ``past_key_values.*``. A runtime may then pass a fixed-size
  buffer ``[batch, kv_heads, max_len, head_dim]`` as both ``past_key_values.i.*`` and
  ``present.i.*`` (ORT IOBinding, the same OrtValue): ``GroupQueryAttention`` sees the same pointer
  and writes the new rows in place instead of copying the whole past into a fresh present every
  step — on SmolLM2 at a 512-token context that copy was ~3.6 ms of a step (30 layers, 2 threads;
  BENCHMARKS.md). Called with an exact-length past and ``past_sequence_length = past.shape[2]``
  the file behaves as before (present = past ++ new). Needs fused attention: it refuses a file in
  which anything but ``GroupQueryAttention`` and ``Shape`` reads the cache.
- :func:`pack_projections` — linears that read the same activation with the same kernel settings
  (q/k/v; gate/up) become one ``MatMulNBits`` (or float ``MatMul``) over the concatenated weights
  and a ``Split``: one activation quantization and one kernel call instead of three (SmolLM2,
  W4A16: 210 → 120 layer kernels, 4.2 → 3.3 ms per step alone). Exact: every output column is the
  same dot product over the same blocks.
- :func:`rms_norm_div` — ``x · Reciprocal(Sqrt(v))`` (what ``aten.rsqrt`` exports to) becomes
  ``x / Sqrt(v)``, the form ORT's ``SimplifiedLayerNormFusion`` matches, so an RMSNorm without a
  residual Add before it (the first) runs as one ``SimplifiedLayerNormalization`` kernel at session
  load while the file keeps only standard ops (``onnx.checker`` rejects that contrib op in the
  default domain at opset 21); then :func:`fuse_skip_rms_norm` writes every residual ``Add`` +
  RMSNorm as one ``com.microsoft.SkipSimplifiedLayerNormalization`` (its 4th output is the sum).
  Rounding-level changes (the fused kernels' own summation order: ≤ 1e-4 on SmolLM2 logits).
- :func:`fuse_rotary` (decode steps) — RoPE moves into ``GroupQueryAttention`` (``do_rotary`` with a
  cos/sin cache computed in float64 from the graph's own ``inv_freq``), and GQA's length inputs are
  read off ``input_ids`` so one computation serves every layer; :func:`pack_qkv_into_gqa` then feeds
  GQA the packed q/k/v projection itself (exact). Only a RoPE that matches transformers'
  ``rotate_half`` exactly is moved, and only for head sizes that are multiples of 16 (ORT's kernel).

- :func:`collapse_reshapes` — a reshape of a reshape becomes one reshape (exact).

Measured on SmolLM2 (2 threads, batch 1, 512-token context): the nodes ORT runs per decode step go
from 1,771 to 380 for W4A16, and the step time is in BENCHMARKS.md.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAST_LENGTH_INPUT = "past_sequence_length"


class OnnxOptimizeError(RuntimeError):
    """A rewrite cannot be applied to this file; the message names the rewrite, node and reason."""


@dataclass
class OptimizeReport:
    """What the rewrites changed."""

    shared_kv_buffer: bool = False
    shape_reads_replaced: int = 0
    packed: list[tuple[str, int]] = field(default_factory=list)  # (op_type, how many merged)
    rms_norms: int = 0
    skip_rms_norms: int = 0
    rotary: int = 0
    packed_qkv: int = 0
    reshapes: int = 0  # reshape-of-reshape chains collapsed

    def summary(self) -> str:
        parts = []
        if self.shared_kv_buffer:
            parts.append(
                f"shared KV buffer (input {PAST_LENGTH_INPUT}; {self.shape_reads_replaced} cache-shape reads replaced)"
            )
        if self.packed:
            sizes = collections.Counter(self.packed)
            text = ", ".join(f"{n} × {k}-way {op}" for (op, k), n in sorted(sizes.items()))
            parts.append(f"packed projections: {text}")
        if self.rotary:
            parts.append(f"RoPE inside {self.rotary} GroupQueryAttention (do_rotary)")
        if self.packed_qkv:
            parts.append(f"packed q/k/v into {self.packed_qkv} GroupQueryAttention")
        if self.skip_rms_norms:
            parts.append(f"{self.skip_rms_norms} residual Add + RMSNorm → SkipSimplifiedLayerNormalization")
        if self.rms_norms:
            parts.append(f"{self.rms_norms} RMSNorms in ORT's fusable Div form")
        if self.reshapes:
            parts.append(f"{self.reshapes} reshape chains collapsed")
        return "ORT rewrites: " + ("; ".join(parts) if parts else "none")


def _users(graph: Any) -> dict[str, list[Any]]:
    users: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                users[name].append(node)
    return users


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _fresh(graph: Any, stem: str) -> str:
    taken = {v for n in graph.node for v in (*n.input, *n.output)}
    taken |= {i.name for i in graph.initializer} | {i.name for i in graph.input}
    k = 0
    while f"{stem}_{k}" in taken:
        k += 1
    return f"{stem}_{k}"


def _rename_input(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


# ---- shared KV buffer ------------------------------------------------------------------------------


def share_kv_buffer(model: Any) -> int:
    """Make the past length an input (module docstring). Returns the number of ``Shape`` reads of
    the cache length replaced. Raises :class:`OnnxOptimizeError` when the cache is read otherwise."""
    import onnx

    graph = model.graph
    if any(i.name == PAST_LENGTH_INPUT for i in graph.input):
        return 0
    past = [i.name for i in graph.input if i.name.startswith("past_key_values.")]
    if not past:
        raise OnnxOptimizeError(
            "share_kv_buffer: the file has no past_key_values.* inputs (not a decode step)"
        )
    users = _users(graph)
    reads = []  # (cache input, Shape node, start, end): checked for every input before any change
    for name in past:
        for node in users.get(name, []):
            if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
                if list(node.input).index(name) not in (3, 4):
                    raise OnnxOptimizeError(
                        f"share_kv_buffer: node {node.name!r} reads {name} as a non-cache input"
                    )
                continue
            if node.op_type != "Shape":
                raise OnnxOptimizeError(
                    f"share_kv_buffer: node {node.name!r} ({node.op_type}) reads the cache {name}; only "
                    "GroupQueryAttention and Shape may (export with fuse_attention=True)"
                )
            start, end = _attr(node, "start", 0), _attr(node, "end", None)
            start = start + 4 if start < 0 else start
            end = 4 if end is None else (end + 4 if end < 0 else min(end, 4))
            if start <= 2 < end:  # reads the length; batch / heads / head_dim the buffer has too
                reads.append((name, node, start, end))
    removed = []
    for name, node, start, end in reads:
        removed.append(node)
        if (start, end) == (2, 3):
            _rename_input(graph, node.output[0], PAST_LENGTH_INPUT)
            continue
        parts = []  # a wider shape read: splice the length in
        if start < 2:
            parts.append(_fresh(graph, "kv_shape_head"))
            graph.node.append(onnx.helper.make_node("Shape", [name], [parts[-1]], start=start, end=2))
        parts.append(PAST_LENGTH_INPUT)
        if end > 3:
            parts.append(_fresh(graph, "kv_shape_tail"))
            graph.node.append(onnx.helper.make_node("Shape", [name], [parts[-1]], start=3, end=end))
        graph.node.append(
            onnx.helper.make_node("Concat", parts, [node.output[0]], axis=0, name=node.name + "_kvlen")
        )
    for node in removed:
        graph.node.remove(node)
    graph.input.append(onnx.helper.make_tensor_value_info(PAST_LENGTH_INPUT, onnx.TensorProto.INT64, [1]))
    for out in graph.output:  # past + new when the cache is concatenated, the buffer's length when shared
        if out.name.startswith("present.") and len(out.type.tensor_type.shape.dim) == 4:
            dim = out.type.tensor_type.shape.dim[2]
            dim.Clear()
            dim.dim_param = "present_sequence"
    _toposort(graph)
    return len(reads)


def _toposort(graph: Any) -> None:
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
            raise OnnxOptimizeError(
                f"toposort: {len(rest)} nodes have unproduced inputs, e.g. {rest[0].name!r}"
            )
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


# ---- packed projections ----------------------------------------------------------------------------


def _initializers(graph: Any) -> dict[str, Any]:
    return {i.name: i for i in graph.initializer}


def _nbits_key(node: Any, inits: dict[str, Any]) -> tuple | None:
    """What must agree for MatMulNBits nodes to share one kernel call (None: not packable)."""
    weights = [n for n in node.input[1:] if n]
    if any(n not in inits for n in weights):
        return None
    present = tuple(bool(n) for n in node.input[1:])
    attrs = tuple(sorted((a.name, str(_attr(node, a.name))) for a in node.attribute if a.name != "N"))
    if len(node.input) > 4 and any(node.input[4:]):  # g_idx / bias: not handled
        return None
    return ("MatMulNBits", node.input[0], present, attrs)


def _matmul_key(node: Any, inits: dict[str, Any]) -> tuple | None:
    b = inits.get(node.input[1])
    if b is None or len(b.dims) != 2:
        return None
    return ("MatMul", node.input[0], b.dims[0], b.data_type)


def pack_projections(model: Any) -> list[tuple[str, int]]:
    """Merge linears that read one activation (module docstring). Returns ``(op_type, k)`` per merge."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    groups: dict[tuple, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        key = None
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            key = _nbits_key(node, inits)
        elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            key = _matmul_key(node, inits)
        if key is not None:
            groups[key].append(node)
    shared = collections.Counter(name for n in graph.node for name in n.input)
    merged: list[tuple[str, int]] = []
    drop_inits: set[str] = set()
    for key, nodes in groups.items():
        if len(nodes) < 2:
            continue
        op_type = key[0]
        first = nodes[0]
        out = _fresh(graph, f"packed_{first.name or 'linear'}")
        if op_type == "MatMulNBits":
            widths = [int(_attr(n, "N")) for n in nodes]
            new_inputs = [first.input[0]]
            for slot in range(1, len(first.input)):
                if not first.input[slot]:
                    new_inputs.append("")
                    continue
                arrays = [numpy_helper.to_array(inits[n.input[slot]]) for n in nodes]
                name = _fresh(graph, f"{first.input[slot]}_merged")
                graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=0), name))
                new_inputs.append(name)
            packed = onnx.helper.make_node("MatMulNBits", new_inputs, [out], name=out, domain="com.microsoft")
            packed.attribute.extend(a for a in first.attribute if a.name != "N")
            packed.attribute.append(onnx.helper.make_attribute("N", sum(widths)))
        else:
            arrays = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
            widths = [a.shape[1] for a in arrays]
            name = _fresh(graph, f"{first.input[1]}_merged")
            graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), name))
            packed = onnx.helper.make_node("MatMul", [first.input[0], name], [out], name=out)
        split_sizes = _fresh(graph, f"{out}_sizes")
        graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), split_sizes))
        split = onnx.helper.make_node(
            "Split", [out, split_sizes], [n.output[0] for n in nodes], axis=-1, name=f"{out}_split"
        )
        at = list(graph.node).index(first)
        for node in nodes:
            graph.node.remove(node)
            for slot in node.input[1:]:
                if slot and shared[slot] == 1:
                    drop_inits.add(slot)
        graph.node.insert(at, split)
        graph.node.insert(at, packed)
        merged.append((op_type, len(nodes)))
    if drop_inits:
        kept = [i for i in graph.initializer if i.name not in drop_inits]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    _toposort(graph)
    return merged


# ---- RoPE inside GroupQueryAttention --------------------------------------------------------------


class _NoMatch(Exception):
    pass


class _Graph:
    """Producer / initializer look-ups for pattern checks on the protobuf graph."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.inits = _initializers(graph)
        self._np = numpy_helper

    def node(self, name: str, op_type: str) -> Any:
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            raise _NoMatch(f"{name} is not the output of a {op_type}")
        return node

    def const(self, name: str) -> np.ndarray:
        if name in self.inits:
            return self._np.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return self._np.to_array(_attr(node, "value"))
        raise _NoMatch(f"{name} is not a constant")


def _match_rope(g: _Graph, value: str, head_dim: int) -> tuple[str, str, str, str]:
    """``value`` (GQA's q or k input) = ``Reshape(Transpose(rope(Transpose(Reshape(base)))))`` with
    ``rope(x) = x·cos + cat(-x[..., D/2:], x[..., :D/2])·sin`` (transformers' ``rotate_half``).
    Returns ``(base, cos, sin, rotated)``: the projection's ``[B, S, heads·D]`` output, the cos/sin
    tensors and the rotated BHSD tensor."""
    out = g.node(value, "Reshape")
    t_out = g.node(out.input[0], "Transpose")
    add = g.node(t_out.input[0], "Add")
    if _attr(t_out, "perm") != [0, 2, 1, 3]:
        raise _NoMatch("transpose perm")
    muls = [g.node(i, "Mul") for i in add.input]
    x = None
    for mul in muls:  # the x·cos term: one input is the BHSD activation (a Transpose)
        for i, other in ((0, 1), (1, 0)):
            src = g.producer.get(mul.input[i])
            if src is not None and src.op_type == "Transpose" and _attr(src, "perm") == [0, 2, 1, 3]:
                x, cos, cos_mul = src, mul.input[other], mul
    if x is None:
        raise _NoMatch("no x·cos term")
    sin_mul = next(m for m in muls if m is not cos_mul)
    cat_name, sin = None, None
    for i, other in ((0, 1), (1, 0)):
        src = g.producer.get(sin_mul.input[i])
        if src is not None and src.op_type == "Concat":
            cat_name, sin = sin_mul.input[i], sin_mul.input[other]
    if cat_name is None:
        raise _NoMatch("no rotate_half term")
    cat = g.node(cat_name, "Concat")
    if _attr(cat, "axis") not in (-1, 3) or len(cat.input) != 2:
        raise _NoMatch("rotate_half concat axis")
    neg = g.node(cat.input[0], "Neg")
    hi, lo = g.node(neg.input[0], "Slice"), g.node(cat.input[1], "Slice")
    half = head_dim // 2
    for sl, (start, end) in ((hi, (half, None)), (lo, (0, half))):
        if sl.input[0] != x.output[0]:
            raise _NoMatch("rotate_half slices another tensor")
        starts, ends = g.const(sl.input[1]), g.const(sl.input[2])
        axes = g.const(sl.input[3]) if len(sl.input) > 3 and sl.input[3] else np.array([-1])
        steps = g.const(sl.input[4]) if len(sl.input) > 4 and sl.input[4] else np.array([1])
        if int(axes[0]) not in (-1, 3) or int(steps[0]) != 1 or int(starts[0]) != start:
            raise _NoMatch("rotate_half slice bounds")
        if (end is None and int(ends[0]) < head_dim) or (end is not None and int(ends[0]) != end):
            raise _NoMatch("rotate_half slice bounds")
    view = g.node(x.input[0], "Reshape")
    return view.input[0], cos, sin, add.output[0]


def _match_cos_sin(g: _Graph, cos: str, sin: str, head_dim: int) -> np.ndarray:
    """``cos``/``sin`` = ``Unsqueeze(Cos|Sin(cat(f, f)))``, ``f = positions · inv_freq``, positions
    = ``past_len + Range(0, S, 1)``. Returns ``inv_freq`` (``[D/2]``)."""
    cat_names = []
    for name, fn in ((cos, "Cos"), (sin, "Sin")):
        unsq = g.node(name, "Unsqueeze")
        cat_names.append(g.node(unsq.input[0], fn).input[0])
    if cat_names[0] != cat_names[1]:
        raise _NoMatch("cos and sin of different angles")
    cat = g.node(cat_names[0], "Concat")
    if len(cat.input) != 2 or cat.input[0] != cat.input[1] or _attr(cat, "axis") not in (-1, 2):
        raise _NoMatch("angles are not cat(f, f)")
    mul = g.node(cat.input[0], "Mul")
    inv_freq, positions = None, None
    for i, other in ((0, 1), (1, 0)):
        try:
            arr = g.const(mul.input[i])
        except _NoMatch:
            continue
        if arr.size == head_dim // 2:
            inv_freq, positions = arr.reshape(-1).astype(np.float64), mul.input[other]
    if inv_freq is None:
        raise _NoMatch("no inv_freq constant")
    pos = g.node(g.node(positions, "Cast").input[0], "Unsqueeze")
    add = g.node(pos.input[0], "Add")
    rng = next(
        (g.producer[i] for i in add.input if g.producer.get(i) and g.producer[i].op_type == "Range"), None
    )
    if rng is None or int(g.const(rng.input[0])) != 0 or int(g.const(rng.input[2])) != 1:
        raise _NoMatch("positions are not past + arange(S)")
    return inv_freq


_BHSD_TO_BSH = {(0, 1): (0, 1), (2, 3): (1, 2)}


def fuse_rotary(model: Any, max_positions: int) -> int:
    """Move each layer's RoPE into its ``GroupQueryAttention`` (``do_rotary=1`` with a shared cos/sin
    cache of ``max_positions`` rows, computed in float64 from the graph's own ``inv_freq``): q and k
    go to GQA straight from their projections, ~20 nodes a layer fewer. GQA rotates the query row
    ``s`` at position ``past + s`` — the positions the matched graph computes. Returns how many GQA
    nodes were changed; a layer whose RoPE does not match exactly is left as it is, and so is every
    layer when the head size is not a multiple of 16 (ORT's kernel refuses that with ``do_rotary``)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    g = _Graph(graph)
    readers = _users(graph)
    caches: dict[bytes, tuple[str, str]] = {}
    fused = 0
    for node in list(graph.node):
        if (
            node.op_type != "GroupQueryAttention"
            or node.domain != "com.microsoft"
            or _attr(node, "do_rotary", 0)
        ):
            continue
        if len(node.input) > 7 and any(node.input[7:10]):
            continue
        heads = int(_attr(node, "num_heads"))
        try:
            shape = g.const(g.node(node.input[0], "Reshape").input[1])
            head_dim = int(shape[-1]) // heads
            if head_dim % 16:  # ORT's GQA: "head_size shall be a multiple of 16" with do_rotary
                raise _NoMatch(f"head_dim {head_dim} is not a multiple of 16")
            q, cos_q, sin_q, q_rot = _match_rope(g, node.input[0], head_dim)
            k, cos_k, sin_k, k_rot = _match_rope(g, node.input[1], head_dim)
            if (cos_q, sin_q) != (cos_k, sin_k):
                raise _NoMatch("q and k rotated by different angles")
            inv_freq = _match_cos_sin(g, cos_q, sin_q, head_dim)
        except _NoMatch:
            continue
        key = inv_freq.tobytes()
        if key not in caches:
            angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
            names = (_fresh(graph, "rope_cos_cache"), _fresh(graph, "rope_sin_cache"))
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
        # GQA's length inputs read batch and sequence off the rotated BHSD q: read them off
        # input_ids ([B, S], the same in every layer, so ORT's CSE shares one length computation)
        # or else the projection's BSH output; either way the RoPE nodes are dead and pruned
        ids = "input_ids" if any(i.name == "input_ids" for i in graph.input) else None
        for rotated, base in ((q_rot, ids or q), (k_rot, ids or k)):
            for reader in readers.get(rotated, []):
                if reader.op_type != "Shape":
                    continue
                span = _BHSD_TO_BSH.get((_attr(reader, "start", 0), _attr(reader, "end", None)))
                if span is not None:  # batch stays dim 0; the sequence moves from dim 2 to 1
                    reader.input[0] = base
                    del reader.attribute[:]
                    reader.attribute.extend(
                        [helper.make_attribute("start", span[0]), helper.make_attribute("end", span[1])]
                    )
        fused += 1
    if fused:
        _prune(graph)
    return fused


def _prune(graph: Any) -> None:
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


def _layout_identity_source(g: _Graph, value: str, width: int) -> str:
    """Follow ``value`` back through Reshape / Transpose nodes that together change nothing (the
    Transposes compose to the identity, the last Reshape restores ``[B, S, width]`` with
    ``[0, 0, width]``) and return the tensor they start from."""
    last = g.node(value, "Reshape")
    shape = g.const(last.input[1]).tolist()
    if shape != [0, 0, width]:
        raise _NoMatch("final reshape is not [0, 0, width]")
    perm = list(range(4))
    name = last.input[0]
    while name in g.producer and g.producer[name].op_type in ("Reshape", "Transpose"):
        node = g.producer[name]
        if node.op_type == "Transpose":
            p = list(_attr(node, "perm"))
            if len(p) != 4:
                raise _NoMatch("transpose rank")
            perm = [perm[i] for i in p]
        name = node.input[0]
    if perm != list(range(4)):
        raise _NoMatch("transposes do not cancel")
    return name


def pack_qkv_into_gqa(model: Any) -> int:
    """Feed each ``GroupQueryAttention`` (RoPE already inside, :func:`fuse_rotary`) the packed q/k/v
    projection output directly (GQA's packed-QKV form: ``key``/``value`` empty) when q, k and v are
    the three outputs of one ``Split`` ([heads·D, kv·D, kv·D]) of :func:`pack_projections`, v through
    layout ops that cancel. Exact (the same numbers reach the kernel); drops a Split and v's
    reshapes per layer. Returns how many GQA nodes were changed."""
    graph = model.graph
    g = _Graph(graph)
    changed = 0
    for node in graph.node:
        if (
            node.op_type != "GroupQueryAttention"
            or node.domain != "com.microsoft"
            or not _attr(node, "do_rotary", 0)
        ):
            continue
        if len(node.input) < 3 or not node.input[1] or not node.input[2]:
            continue
        split = g.producer.get(node.input[0])
        if split is None or split.op_type != "Split" or len(split.output) != 3:
            continue
        try:
            sizes = g.const(split.input[1]).tolist() if len(split.input) > 1 else None
            heads, kv_heads = int(_attr(node, "num_heads")), int(_attr(node, "kv_num_heads"))
            if (
                not sizes
                or len(sizes) != 3
                or sizes[0] * kv_heads != sizes[1] * heads
                or sizes[1] != sizes[2]
            ):
                raise _NoMatch("split sizes")
            if _attr(split, "axis", 0) not in (-1, 2):
                raise _NoMatch("split axis")
            if split.output[0] != node.input[0] or split.output[1] != node.input[1]:
                raise _NoMatch("q/k are not split outputs 0/1")
            if _layout_identity_source(g, node.input[2], sizes[2]) != split.output[2]:
                raise _NoMatch("v is not split output 2")
        except _NoMatch:
            continue
        node.input[0] = split.input[0]
        node.input[1] = ""
        node.input[2] = ""
        changed += 1
    if changed:
        _prune(graph)
    return changed


# ---- RMSNorm in ORT's fusable form -----------------------------------------------------------------


def rms_norm_div(model: Any) -> int:
    """``Mul(x, Reciprocal(Sqrt(v)))`` → ``Div(x, Sqrt(v))`` (module docstring). Returns how many."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    users = _users(graph)
    outputs = {o.name for o in graph.output}
    removed = []
    for node in graph.node:
        if node.op_type != "Reciprocal" or node.output[0] in outputs:
            continue
        sqrt = producer.get(node.input[0])
        consumers = users.get(node.output[0], [])
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


def fuse_skip_rms_norm(model: Any) -> int:
    """``Add(x, y)`` followed by an RMSNorm of the sum in the Div form (:func:`rms_norm_div`) →
    ``com.microsoft.SkipSimplifiedLayerNormalization(x, y, gamma)``, whose fourth output is the sum
    (the residual stream the next block reads). One kernel and one pass over the activation instead
    of seven nodes. Norms without a constant ``gamma`` multiply are left to ORT's own fusion.
    Returns how many were fused."""
    from onnx import helper

    graph = model.graph
    g = _Graph(graph)
    users = _users(graph)
    outputs = {o.name for o in graph.output}
    fused, dead = 0, []
    for div in list(graph.node):
        if div.op_type != "Div":
            continue
        try:
            add = g.node(div.input[0], "Add")
            sqrt = g.node(div.input[1], "Sqrt")
            eps_add = g.node(sqrt.input[0], "Add")
            mean_name = next(
                i for i in eps_add.input if i in g.producer and g.producer[i].op_type == "ReduceMean"
            )
            eps = float(g.const(next(i for i in eps_add.input if i != mean_name)).reshape(-1)[0])
            mean = g.producer[mean_name]
            axes = g.const(mean.input[1]).tolist() if len(mean.input) > 1 else _attr(mean, "axes")
            if list(axes) not in ([-1], [2]) or _attr(mean, "keepdims", 1) != 1:
                raise _NoMatch("reduce axes")
            power = g.node(mean.input[0], "Pow")
            if power.input[0] != add.output[0] or float(g.const(power.input[1]).reshape(-1)[0]) != 2.0:
                raise _NoMatch("not mean(sum²)")
            muls = users.get(div.output[0], [])
            if len(muls) != 1 or muls[0].op_type != "Mul":
                raise _NoMatch("no gamma multiply")
            mul = muls[0]
            gamma = next(i for i in mul.input if i != div.output[0])
            if g.const(gamma).ndim != 1:
                raise _NoMatch("gamma is not a vector")
            private = (power, mean, eps_add, sqrt, div)
            for node in private[:-1]:
                if any(u not in private for u in users.get(node.output[0], [])) or node.output[0] in outputs:
                    raise _NoMatch("intermediate read elsewhere")
        except (_NoMatch, StopIteration):
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
        dead += [add, power, mean, eps_add, sqrt, div, mul]
        fused += 1
    for node in dead:
        graph.node.remove(node)
    if fused:
        _toposort(graph)
    return fused


# ---- reshape chains ---------------------------------------------------------------------------------


def collapse_reshapes(model: Any) -> int:
    """``Reshape(Identity*(Reshape(x, s1)), s2)`` → ``Reshape(x, s2)`` when the inner reshape (and the
    identities) feed nothing else and ``s2`` cannot refer to the inner shape (``allowzero = 1``, or a
    constant without zeros: a 0 would copy a dim of the inner result). Exact: a reshape only relabels
    the same row-major elements. A cleanup for layouts the exporter leaves in pairs, e.g. an attention
    output's ``[B, S, H, D]`` view and back when the lowering could not absorb the heads' merge
    (``merge_heads``, :mod:`.attention`). Returns the number of reshapes removed."""
    graph = model.graph
    g = _Graph(graph)
    users = _users(graph)
    outputs = {o.name for o in graph.output}
    removed = 0
    for node in list(graph.node):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        if not _attr(node, "allowzero", 0):
            try:
                if 0 in g.const(node.input[1]).tolist():
                    continue
            except _NoMatch:
                continue
        chain, name = [], node.input[0]
        while name in g.producer and g.producer[name].op_type == "Identity":
            chain.append(g.producer[name])
            name = g.producer[name].input[0]
        inner = g.producer.get(name)
        if inner is None or inner.op_type != "Reshape" or inner.domain not in ("", "ai.onnx"):
            continue
        chain.append(inner)
        private = all(n.output[0] not in outputs and len(users.get(n.output[0], [])) == 1 for n in chain)
        if not private:
            continue
        node.input[0] = inner.input[0]
        for n in chain:
            graph.node.remove(n)
        removed += 1
    return removed


def rewrite_for_ort(
    path: Any,
    *,
    share_kv: bool = False,
    pack: bool = False,
    rms_div: bool = False,
    rotary_positions: int | None = None,
) -> OptimizeReport:
    """Apply the chosen rewrites to the file at ``path`` in place (``rotary_positions``: fuse RoPE
    into GQA with a cos/sin cache of that many positions)."""
    import onnx

    report = OptimizeReport()
    if not (share_kv or pack or rms_div or rotary_positions):
        return report
    model = onnx.load(str(path))
    if share_kv:
        report.shape_reads_replaced = share_kv_buffer(model)
        report.shared_kv_buffer = True
    if pack:
        report.packed = pack_projections(model)
    if rms_div:
        report.rms_norms = rms_norm_div(model)
        report.skip_rms_norms = fuse_skip_rms_norm(model)
    if rotary_positions:
        report.rotary = fuse_rotary(model, rotary_positions)
        report.packed_qkv = pack_qkv_into_gqa(model)
    report.reshapes = collapse_reshapes(model)
    onnx.save(model, str(path))
    return report
