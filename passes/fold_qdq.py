"""``fold_qdq``: turn the quantize pass's Q/DQ graph into packed constants and quantized-linear ops.

The quantize pass leaves every quantized linear as ``linear(x̂, dequantize(q, scale, zp, g), b)``
with ``x̂`` either the float input (weight-only) or ``dequantize(quantize(x, s, z))``. This pass:

1. removes redundant ``dequantize → quantize`` pairs (re-quantizing a value with the parameters it
   was dequantized with, onto a grid at least as wide, gives back the same integers);
2. packs each weight: 4-bit → two values per byte in MatMulNBits' layout (see
   :mod:`qcompile.ops.qlinear`: offset-binary ``q + 8``, low nibble first, the ragged last group
   padded); 8-bit weight-only → blocked uint8 ``q + 128`` (MatMulNBits' 8-bit layout); 8-bit with
   integer activations → the int8 ``q`` as is (an integer GEMM reads it). Symmetric zero points
   (all zero) are dropped;
3. matches each linear into ``qcompile::qlinear_w`` (float activations: W4A16, W8A16) or
   ``qcompile::qlinear_wa`` (integer activations: W8A8, W4A8, W4A4, per-token dynamic or per-tensor
   static), which then reads the activation's *integer* tensor: the activation ``dequantize`` goes;
4. matches ``embedding(dequantize(q, …), ids)`` (written by ``quantize`` for an annotated embedding,
   :mod:`qcompile.passes.quantize`) into ``qcompile::qembedding``. Each q constant is packed once,
   so a tied lm_head and embedding share one packed table.

Folding changes no numbers: the new ops' reference implementations run exactly the float operations
of the unfolded graph (tested bit for bit). A 4-bit weight whose group size MatMulNBits cannot take
(not a power of two ≥ 16, or per channel) keeps its int8 container (``w_bits = 8``: still exact) and
the report says so.
"""

from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile import ops
from qcompile.ir import QGraph, keys
from qcompile.ops import QEMBEDDING, QLINEAR_W, QLINEAR_WA
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass
from qcompile.quant.packing import (
    UINT8_OFFSET,
    int4_packable,
    pack_int4_weight,
    pack_int4_zero_point,
    pack_int8_blocked,
)

_LINEAR = torch.ops.aten.linear.default
_EMBEDDING = torch.ops.aten.embedding.default


@dataclass
class FoldedLinear:
    """One linear (or embedding) after folding: which op it became and what its weight costs now.
    A weight shared with an earlier one (tied lm_head/embedding) counts 0 bytes before and after."""

    node: str  # the aten.linear / aten.embedding it replaced
    op: str  # qlinear_w | qlinear_wa | qembedding
    role: str
    scheme: str
    storage: str  # "int4 packed" | "int8 blocked" | "int8" | "int4 in int8 (…)"
    weight_bytes_before: int  # int8 q + scale + zero point
    weight_bytes_after: int


@dataclass
class _PackedWeight:
    w: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    storage: str

    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (self.w, self.scale, self.zero_point))


@register_pass
class FoldQDQPass(Pass):
    """Pack quantized weights and form ``qcompile::qlinear_*`` ops (see the module docstring)."""

    name: ClassVar[str] = "fold_qdq"
    kind = "lowering"
    ensures = (facts.FOLDED,)
    # the quantized linears become new qlinear nodes: the structural analysis names nodes that are gone
    invalidates = (facts.STRUCTURE,)

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        pairs = remove_redundant_requantize(qgraph)
        packer = _Packer(qgraph)
        rows = []
        for node in list(qgraph.graph.nodes):
            if node.op != "call_function" or _weight_dequantize(node) is None:
                continue
            if node.target is _LINEAR:
                rows.append(_fold_linear(qgraph, packer, node))
            elif node.target is _EMBEDDING:
                rows.append(_fold_embedding(qgraph, packer, node))
        qgraph.graph.eliminate_dead_code()
        _drop_unused_buffers(qgraph)
        qgraph.recompile()
        if rows:  # its linears are qlinear nodes now: the analysis no longer describes the graph
            qgraph.info.pop(keys.INFO_STRUCTURE, None)
        qgraph.info[keys.INFO_FOLD] = {r.node: r.op for r in rows}
        report = {
            "folded": len(rows),
            "requantize_pairs_removed": pairs,
            "weight_bytes_before": sum(r.weight_bytes_before for r in rows),
            "weight_bytes_after": sum(r.weight_bytes_after for r in rows),
            "linears": [asdict(r) for r in rows],
        }
        return PassResult(qgraph, changed=bool(rows or pairs), report=report, summary=_summary(report, rows))


class _Packer:
    """Packs each quantized weight once: a tied lm_head and embedding read the same q constant and
    end up sharing one packed constant."""

    def __init__(self, qgraph: QGraph) -> None:
        self.qgraph = qgraph
        self.done: dict[
            tuple[str, int, bool], tuple[_PackedWeight, tuple[fx.Node, fx.Node, fx.Node | None]]
        ] = {}

    def pack(
        self, deq: fx.Node, scheme: str, user: fx.Node, weight_only: bool
    ) -> tuple[_PackedWeight, tuple, int]:
        """(packed storage, its constant nodes, bytes of the unfolded q/scale/zp); the bytes count
        0 for a weight packed before (shared)."""
        q_node, s_node, z_node, group_size = deq.args
        key = (str(q_node.target), int(group_size), weight_only)
        q, scale, zp = (self.qgraph.get_constant(n) for n in (q_node, s_node, z_node))
        if key in self.done:
            packed, nodes = self.done[key]
            return packed, nodes, 0
        packed = pack_weight(q, scale, zp, int(group_size), _declared_bits(scheme, q, user), weight_only)
        hint = str(q_node.target).removeprefix("_qc_").removesuffix("_q")
        w_node = self.qgraph.add_constant(f"{hint}_packed", packed.w)
        ws_node = self.qgraph.add_constant(f"{hint}_pscale", packed.scale)
        wz_node = None
        if packed.zero_point is not None:
            wz_node = self.qgraph.add_constant(f"{hint}_pzero_point", packed.zero_point)
        self.done[key] = (packed, (w_node, ws_node, wz_node))
        return packed, (w_node, ws_node, wz_node), sum(_nbytes(t) for t in (q, scale, zp))


def _replace(qgraph: QGraph, old: fx.Node, op: Any, args: tuple) -> None:
    with qgraph.graph.inserting_before(old):
        new = qgraph.graph.call_function(op, args)
    new.meta["val"] = old.meta["val"]
    new.meta[keys.NAMESPACE] = dict(keys.get(old))
    old.replace_all_uses_with(new)
    qgraph.graph.erase_node(old)


def _fold_linear(qgraph: QGraph, packer: _Packer, linear: fx.Node) -> FoldedLinear:
    deq = _weight_dequantize(linear)
    ann = keys.get(linear)
    scheme = str(ann.get(keys.QUANT, ""))
    x, bias = linear.args[0], (linear.args[2] if len(linear.args) > 2 else None)
    act = _quantized_activation(qgraph, x)
    packed, (w_node, ws_node, wz_node), before = packer.pack(deq, scheme, linear, weight_only=act is None)
    tail = (bias, packed.bits, int(deq.meta["val"].shape[1]), int(deq.args[3]))
    if act is None:
        op, op_name, args = QLINEAR_W, "qlinear_w", (x, w_node, ws_node, wz_node, *tail)
    else:
        op, op_name, args = QLINEAR_WA, "qlinear_wa", (*act, w_node, ws_node, wz_node, *tail)
    role = str(ann.get(keys.ROLE, "linear"))
    _replace(qgraph, linear, op, args)
    return FoldedLinear(
        linear.name, op_name, role, scheme, packed.storage, before, packed.nbytes() if before else 0
    )


def _fold_embedding(qgraph: QGraph, packer: _Packer, embedding: fx.Node) -> FoldedLinear:
    """``embedding(dequantize(q, s, z, g), ids)`` → ``qembedding(ids, packed, …)``."""
    deq = embedding.args[0]
    ann = keys.get(embedding)
    scheme = str(ann.get(keys.QUANT, ""))
    packed, (w_node, ws_node, wz_node), before = packer.pack(deq, scheme, embedding, weight_only=True)
    dim = int(deq.meta["val"].shape[1])
    _replace(
        qgraph,
        embedding,
        QEMBEDDING,
        (embedding.args[1], w_node, ws_node, wz_node, packed.bits, dim, int(deq.args[3])),
    )
    return FoldedLinear(
        embedding.name,
        "qembedding",
        "embedding",
        scheme,
        packed.storage,
        before,
        packed.nbytes() if before else 0,
    )


def pack_weight(
    q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, group_size: int, bits: int, weight_only: bool
) -> _PackedWeight:
    """The folded storage of one weight (layouts: :mod:`qcompile.ops.qlinear`). 4-bit → packed
    nibbles; 8-bit weight-only with a block-sized group → blocked uint8 (MatMulNBits 8 bits); else
    plain int8 (an integer GEMM reads it as is)."""
    symmetric = not bool(zp.any())
    blockable = int4_packable(group_size)
    if bits == 4 and blockable:
        zpp = None if symmetric else pack_int4_zero_point(zp)
        return _PackedWeight(pack_int4_weight(q, group_size), scale, zpp, 4, "int4 packed")
    if bits == 8 and weight_only and blockable:
        zpp = None if symmetric else (zp.to(torch.int16) + UINT8_OFFSET).to(torch.uint8)
        return _PackedWeight(pack_int8_blocked(q, group_size), scale, zpp, 8, "int8 blocked")
    storage = "int8"
    if bits == 4:
        why = "per channel" if group_size == 0 else f"group {group_size} not a power of two >= 16"
        storage = f"int4 in int8 ({why})"
    return _PackedWeight(q, scale, None if symmetric else zp, 8, storage)


def _declared_bits(scheme: str, q: torch.Tensor, linear: fx.Node) -> int:
    """Weight bits from the scheme string the quantize pass wrote (``w4g128s-a16`` → 4), checked
    against the values; without a scheme, 4 when every value fits [-8, 7]."""
    fits4 = int(q.min()) >= -8 and int(q.max()) <= 7
    m = re.match(r"w(\d+)", scheme)
    if m is None:
        return 4 if fits4 else 8
    bits = int(m.group(1))
    if bits <= 4 and not fits4:
        raise PassError(
            FoldQDQPass.name, f"scheme {scheme} says {bits}-bit weights but q exceeds [-8, 7]", linear.name
        )
    return 4 if bits <= 4 else 8


def _weight_dequantize(node: fx.Node) -> fx.Node | None:
    """The ``dequantize(get_attr q, get_attr scale, get_attr zp, g)`` giving a linear's weight
    (argument 1) or an embedding's table (argument 0)."""
    if node.target is _LINEAR:
        w = node.args[1] if len(node.args) > 1 else None
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is not None and not isinstance(bias, fx.Node):
            return None
    elif node.target is _EMBEDDING:
        w = node.args[0]
    else:
        return None
    if not (isinstance(w, fx.Node) and w.target is ops.DEQUANTIZE):
        return None
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in w.args[:3]):
        return None
    return w


def _quantized_activation(qgraph: QGraph, x: Any) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """``(xq, x_scale, x_zero_point or None)`` when ``x = dequantize(xq, s, z, 0)`` per token or per
    tensor; None when x is a float activation."""
    if not (isinstance(x, fx.Node) and x.target is ops.DEQUANTIZE and x.args[3] == 0):
        return None
    xq, xs, xz = x.args[:3]
    return xq, xs, None if _is_zero(qgraph, xz) else xz


def _is_zero(qgraph: QGraph, zp: fx.Node) -> bool:
    """A zero point known to be 0: a constant of zeros, or the zero point of a symmetric
    ``choose_qparams_per_token``."""
    if zp.op == "get_attr":
        return not bool(qgraph.get_constant(zp).any())
    if zp.target is operator.getitem and zp.args[1] == 1:
        src = zp.args[0]
        return src.target is ops.CHOOSE_QPARAMS_PER_TOKEN and bool(src.args[3])
    return False


def remove_redundant_requantize(qgraph: QGraph) -> int:
    """``quantize(dequantize(q, s, z, g), s, z, qmin, qmax, g) → q`` when q is already on that grid
    (it came from a quantize onto ``[qmin', qmax'] ⊆ [qmin, qmax]`` with the same s and z).
    Returns the number of pairs removed."""
    removed = 0
    for node in list(qgraph.graph.nodes):
        if node.target is not ops.QUANTIZE:
            continue
        deq = node.args[0]
        if not (isinstance(deq, fx.Node) and deq.target is ops.DEQUANTIZE):
            continue
        q, s, z, g = deq.args
        _, s2, z2, qmin, qmax, g2 = node.args
        if (s, z, g) != (s2, z2, g2) or not _on_grid(q, s, z, qmin, qmax):
            continue
        node.replace_all_uses_with(q)
        qgraph.graph.erase_node(node)
        removed += 1
    return removed


def _on_grid(q: Any, s: fx.Node, z: fx.Node, qmin: int, qmax: int) -> bool:
    if not (isinstance(q, fx.Node) and q.target is ops.QUANTIZE):
        return False
    _, s1, z1, qmin1, qmax1, _ = q.args
    return (s1, z1) == (s, z) and qmin <= qmin1 and qmax1 <= qmax


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _drop_unused_buffers(qgraph: QGraph) -> None:
    """Remove constants no get_attr reads any more (the int8 q tensors that were packed)."""
    used = {str(n.target) for n in qgraph.graph.nodes if n.op == "get_attr"}
    for path, module in list(qgraph.graph_module.named_modules()):
        for name in list(module._buffers):
            if (f"{path}.{name}" if path else name) not in used:
                del module._buffers[name]


def _summary(report: dict[str, Any], rows: list[FoldedLinear]) -> str:
    by_op: dict[str, int] = {}
    by_storage: dict[str, int] = {}
    for r in rows:
        by_op[r.op] = by_op.get(r.op, 0) + 1
        by_storage[r.storage] = by_storage.get(r.storage, 0) + 1
    mb = 1024 * 1024
    ops_text = ", ".join(f"{k} × {v}" for k, v in sorted(by_op.items())) or "none"
    store_text = ", ".join(f"{k} × {v}" for k, v in sorted(by_storage.items())) or "-"
    return (
        f"{report['folded']} linears folded ({ops_text}); weights {store_text}; "
        f"{report['weight_bytes_before'] / mb:.2f} MiB → {report['weight_bytes_after'] / mb:.2f} MiB; "
        f"{report['requantize_pairs_removed']} redundant dequantize→quantize pairs removed"
    )
