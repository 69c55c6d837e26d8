"""How the ``quantize`` pass writes quantization into a QGraph: a weight's constant replaced by
``dequantize(q, scale, zero_point, g)`` on offline constants, an activation's ``quantize → dequantize``
chain (dynamic per token or static per tensor, shared by the linears reading one tensor), an embedding
table's dequantize before its lookup, and a KV-cache entry's static per-channel int8 pair. Every new
node gets ``meta["val"]`` from the ops' fake implementations."""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from qcompile import ops
from qcompile.errors import PassError
from qcompile.ir import QGraph, keys
from qcompile.quant.calibration import LinearInputStats
from qcompile.quant.rtn import (
    QuantizedWeight,
    dequantize_ref,
    quantize_ref,
    sqnr_db,
    static_per_tensor_qparams,
    symmetric_qparams,
)
from qcompile.quant.scheme import ActQuantSpec
from qcompile.quant.spec import KVCacheQuantSpec

PASS_NAME = "quantize"


class QDQWriter:
    """Graph surgery for the pass: new constants and op nodes, each with ``meta["val"]``."""

    def __init__(self, qgraph: QGraph) -> None:
        self.qgraph = qgraph
        self.replaced: list[fx.Node] = []  # float weight get_attr nodes that lost a user
        self.act_cache: dict[tuple, fx.Node] = {}  # (input node, scheme, static range) -> dequantized input

    def replace_weight(self, linear: fx.Node, qw: Any) -> None:
        """linear(x, W) → linear(x, dequantize(q, scale, zp, g)), the constants computed offline."""
        w_node = linear.args[1]
        consts = self._weight_constants(w_node, qw)
        deq = self._call(ops.DEQUANTIZE, (*consts, qw.group_size), before=linear, like=linear)
        linear.replace_input_with(w_node, deq)
        self.replaced.append(w_node)

    def dequantized_table(self, lookup: fx.Node, table: fx.Node, qw: QuantizedWeight) -> fx.Node:
        """``dequantize(q, s, z, g)`` of an embedding table, right before its lookup (the form
        ``fold_qdq`` matches)."""
        consts = self._weight_constants(table, qw)
        with self.qgraph.graph.inserting_before(lookup):
            deq = self.qgraph.graph.call_function(ops.DEQUANTIZE, (*consts, qw.group_size))
        deq.meta["val"] = table.meta["val"]
        return deq

    def _weight_constants(self, w_node: fx.Node, qw: Any) -> list[fx.Node]:
        hint = str(w_node.target)
        return [
            self.qgraph.add_constant(f"{hint}_{suffix}", t, before=w_node)
            for suffix, t in (("q", qw.q), ("scale", qw.scale), ("zero_point", qw.zero_point))
        ]

    def quantize_input(
        self, linear: fx.Node, spec: ActQuantSpec, static_range: tuple[float, float] | None
    ) -> None:
        """Put a QDQ chain on the linear's input; linears reading the same tensor with the same scheme
        (and, when static, the same calibrated range) share it."""
        x = linear.args[0]
        key = (x, spec, static_range)
        if key not in self.act_cache:
            if spec.mode == "dynamic_per_token":
                qp = self._call(
                    ops.CHOOSE_QPARAMS_PER_TOKEN, (x, spec.qmin, spec.qmax, spec.symmetric), linear, linear
                )
                scale = self._getitem(qp, 0, linear)
                zp = self._getitem(qp, 1, linear)
            else:
                val = x.meta["val"]
                s, z = (t.to(val.device) for t in static_per_tensor_qparams(*static_range, spec, val.dtype))
                first = _first_placeholder(self.qgraph)
                scale = self.qgraph.add_constant(f"{linear.name}_act_scale", s, before=first)
                zp = self.qgraph.add_constant(f"{linear.name}_act_zero_point", z, before=first)
            q = self._call(ops.QUANTIZE, (x, scale, zp, spec.qmin, spec.qmax, 0), linear, linear)
            self.act_cache[key] = self._call(ops.DEQUANTIZE, (q, scale, zp, 0), linear, linear)
        linear.replace_input_with(x, self.act_cache[key])

    def quantize_cache_entry(
        self, node: fx.Node, stats: LinearInputStats, spec: KVCacheQuantSpec
    ) -> tuple[float | None, float | None]:
        """Route every reader of ``node`` through ``dequantize(quantize(node))`` with per-channel static
        scales; returns (SQNR dB, clipped fraction) on the calibration sample rows."""
        val = node.meta["val"]
        kv, d = int(val.shape[1]), int(val.shape[3])
        qmin, qmax = spec.qmin, spec.qmax
        scale, zero = symmetric_qparams(stats.channel_absmax, qmin, qmax, val.dtype)  # absmax / 127.5
        scale = scale.to(val.dtype)
        readers = list(node.users)
        anchor = next(iter(self.qgraph.graph.nodes))  # constants go first
        s_node = self.qgraph.add_constant(f"{node.name}_kv_scale", scale.view(1, kv, 1, d), before=anchor)
        z_node = self.qgraph.add_constant(f"{node.name}_kv_zero_point", zero.view(1, kv, 1, d), before=anchor)
        order = {n: i for i, n in enumerate(self.qgraph.graph.nodes)}
        first = min(readers, key=order.__getitem__)
        q = self._call(ops.QUANTIZE, (node, s_node, z_node, qmin, qmax, 0), first, like=node)
        dq = self._call(ops.DEQUANTIZE, (q, s_node, z_node, 0), first, like=node)
        for user in readers:
            user.replace_input_with(node, dq)
        keys.set_(dq, keys.QUANT, spec.scheme())
        samples = stats.samples
        if not samples.numel():
            return None, None
        s = scale.to(samples.dtype).flatten()
        q_samples = quantize_ref(samples, s, zero.flatten(), qmin, qmax, 0)
        clipped = float(((q_samples == qmin) | (q_samples == qmax)).float().mean())
        return sqnr_db(samples, dequantize_ref(q_samples, s, zero.flatten(), 0)), clipped

    def drop_unused_weights(self) -> None:
        """Erase float weight constants nothing reads any more (node and buffer)."""
        self.qgraph.drop_unused_constants([str(w.target) for w in self.replaced])

    # ---- node construction with meta["val"] ----

    def _call(self, op: Any, args: tuple, before: fx.Node, like: fx.Node) -> fx.Node:
        try:
            return self.qgraph.insert_call(op, args, before, like)
        except ValueError as err:
            raise PassError(PASS_NAME, str(err), before.name) from err

    def _getitem(self, node: fx.Node, index: int, before: fx.Node) -> fx.Node:
        with self.qgraph.graph.inserting_before(before):
            item = self.qgraph.graph.call_function(operator.getitem, (node, index))
        item.meta["val"] = node.meta["val"][index]
        return item


def _first_placeholder(qgraph: QGraph) -> fx.Node:
    return next((n for n in qgraph.graph.nodes if n.op == "placeholder"), next(iter(qgraph.graph.nodes)))
