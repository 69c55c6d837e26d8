"""``fuse_attention``: replace each decode-step attention core by one ``qcompile::gqa_attention``.

Why: transformers' attention, captured at ATen level, exports as a decomposition — the cache append
(``cat``), ``repeat_kv`` (``expand`` + ``clone`` of the whole cache per layer), the causal mask built
from ``arange``s, and ``scaled_dot_product_attention`` as Transpose / MatMul / Softmax. In ONNX
Runtime that is ~2,000 small nodes per SmolLM2 decode step and copies of every layer's cache (Kᵀ,
the repeated heads) on every step. This pass (a ``lowering``: the op's reference runs the ATen ops it
replaces, so no number changes beyond float reassociation inside sdpa) finds each
``scaled_dot_product_attention`` whose key and value are (the repeat_kv of) ``cat([past, new], -2)``
and whose mask is the causal ``le`` of key positions ``arange(P + S)`` against query positions
``arange(S) + P`` (:mod:`qcompile.analysis.attention`), and rewrites that core; anything else is left
as it is and the report names the node and the reason. An int8 cache (keys/values quantized per
channel by ``quantize`` on annotated cache entries) becomes ``qcompile::gqa_attention_int8kv`` and the cache inputs int8.

Limits: head counts and head_dim must be static; every layer's cache has the same length (the decode
step's contract); no padding mask.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx
from torch import Tensor

from qcompile.analysis import patterns
from qcompile.analysis.attention import (
    AttentionCore,
    NoMatch,
    match_attention_core,
    same_size,
    tensor_shape,
    tensor_val,
)
from qcompile.ir import QGraph, keys
from qcompile.ops import GQA_ATTENTION, GQA_ATTENTION_INT8KV
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass

aten = torch.ops.aten


# ---- the lowering ----------------------------------------------------------------------------------


@dataclass
class AttentionFusion:
    """The fate of one sdpa: fused, or left as it was and why."""

    node: str  # the sdpa, with its module where known
    fused: bool
    reason: str = ""  # why it was left alone
    heads: int = 0
    kv_heads: int = 0
    int8_cache: bool = False  # lowered to gqa_attention_int8kv (the past/present become int8)


@dataclass
class FuseAttentionReport:
    """Every sdpa of the graph, fused or not (with the reason), and the node count around the pass."""

    rows: list[AttentionFusion] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0

    @property
    def fused(self) -> list[AttentionFusion]:
        return [r for r in self.rows if r.fused]

    @property
    def unfused(self) -> list[AttentionFusion]:
        return [r for r in self.rows if not r.fused]

    @property
    def int8_cache(self) -> bool:
        """Every fused layer stores its cache in int8 (the file's past/present are int8)."""
        return bool(self.fused) and all(r.int8_cache for r in self.fused)

    def summary(self) -> str:
        head = (
            f"fuse_attention: {len(self.fused)}/{len(self.rows)} attention cores → qcompile::gqa_attention; "
            f"{self.nodes_before} → {self.nodes_after} nodes"
        )
        if self.fused:
            r = self.fused[0]
            head += f" ({r.heads} heads over {r.kv_heads} kv heads)"
            if self.int8_cache:
                head += "; int8 KV cache (per-channel scales)"
        return "\n".join([head] + [f"  left as is: {r.node}: {r.reason}" for r in self.unfused])


@register_pass
class FuseAttentionPass(Pass):
    """Replace each decode-step attention core by ``qcompile::gqa_attention`` (module docstring).

    Works in place on the QGraph it is given (target ``onnx`` schedules it for decode steps, after the
    recipe and ``keep_reference``). Changes no numbers beyond float reassociation inside sdpa: the
    op's reference runs the ATen ops it replaces. The structural analysis names the sdpa nodes it
    removes, so a graph it changed has none afterwards."""

    name: ClassVar[str] = "fuse_attention"
    kind = "lowering"
    invalidates = (facts.STRUCTURE,)

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        graph = qgraph.graph
        report = FuseAttentionReport(nodes_before=len(graph.nodes))
        cache_lens = [
            tensor_shape(n)[2]
            for n in graph.nodes
            if n.op == "placeholder" and isinstance(tensor_val(n), Tensor) and tensor_val(n).dim() == 4
        ]
        for sdpa in [n for n in graph.nodes if patterns.is_op(n, patterns.SDPA_OPS)]:
            where = qgraph.display_name(sdpa)
            try:
                core = match_attention_core(sdpa, cache_lens, qgraph.get_constant)
                _rewrite(qgraph, core)
            except NoMatch as exc:
                report.rows.append(AttentionFusion(where, False, str(exc)))
                continue
            int8 = core.key_scale is not None
            report.rows.append(AttentionFusion(where, True, "", core.num_heads, core.kv_heads, int8))
        if any(r.int8_cache for r in report.fused) and not report.int8_cache:
            raise PassError(
                self.name,
                "some layers' KV cache is int8 and others' float; a decode step has one cache dtype "
                "(annotate every layer's cache with kv_cache_bits, or none)",
            )
        if report.fused:
            graph.eliminate_dead_code()  # the masks, repeat_kv copies and cache concats
            qgraph.recompile()
            qgraph.info.pop(keys.INFO_STRUCTURE, None)  # it names the sdpa nodes that are gone
        report.nodes_after = len(graph.nodes)
        qgraph.info[keys.INFO_ATTENTION] = report
        return PassResult(qgraph, changed=bool(report.fused), report=asdict(report), summary=report.summary())


def _merged_heads(core: AttentionCore) -> list[fx.Node]:
    """The graph's ``transpose(1, 2)`` and ``view(B, S, H·D)`` after the sdpa (with the no-op views and
    copies transformers puts around them), when they are its only use: the op then returns ``[B, S,
    H·D]`` itself (``merge_heads``) and ORT's kernel output needs no reshape round trip. Empty when
    the pattern is not there."""
    q_shape, v_shape = tensor_shape(core.query), tensor_shape(core.new_value)
    out_shape = (q_shape[0], q_shape[1], q_shape[2], v_shape[3])
    chain: list[fx.Node] = []
    node, transposed = core.sdpa, False
    copies = {aten.clone.default, aten.contiguous.default, aten.alias.default}
    while len(node.users) == 1:
        (node,) = node.users
        shape = tensor_shape(node)
        if patterns.is_op(node, copies) or (
            not transposed
            and patterns.is_op(node, patterns.RESHAPE_OPS)
            and len(shape) == 4
            and all(same_size(a, b) for a, b in zip(shape, out_shape, strict=True))
        ):
            chain.append(node)  # a copy, or a view to the very shape it had
        elif not transposed and patterns.is_op(node, {aten.transpose.int}):
            if sorted(d % 4 for d in node.args[1:3]) != [1, 2]:
                return []
            chain.append(node)
            transposed = True
        elif transposed and patterns.is_op(node, patterns.RESHAPE_OPS) and len(shape) == 3:
            merged = shape[2] == q_shape[1] * v_shape[3]
            same_rows = same_size(shape[0], q_shape[0]) and same_size(shape[1], q_shape[2])
            return [*chain, node] if merged and same_rows else []
        else:
            return []
    return []


def _rewrite(qgraph: QGraph, core: AttentionCore) -> None:
    """Insert ``gqa_attention`` (``gqa_attention_int8kv`` for an int8 cache, whose past inputs become
    int8) after the last of its inputs and route the sdpa's (or its merged-heads view's) and the cache
    concats' outside users (the graph outputs ``present.*``) to its results."""
    graph = qgraph.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs: tuple = (core.query, core.new_key, core.new_value, core.past_key, core.past_value)
    anchor = max(inputs, key=order.__getitem__)
    merge = _merged_heads(core)
    out = merge[-1] if merge else core.sdpa
    replaced = ((out, 0), (core.key_cat, 1), (core.value_cat, 2))
    core_nodes = core.internal | {core.sdpa, *merge}
    for node, _ in replaced:
        early = [u.name for u in node.users if u not in core_nodes and order[u] <= order[anchor]]
        if early:
            raise NoMatch(
                f"`{node.name}` is used by {early} before `{anchor.name}`, where the fused op must go"
            )
    if core.key_scale is None:
        target, args = GQA_ATTENTION, (*inputs, core.scale, bool(merge))
    else:
        with qgraph.fake_mode():
            for past in (core.past_key, core.past_value):
                if tensor_val(past).dtype != torch.int8:
                    past.meta["val"] = torch.empty_like(tensor_val(past), dtype=torch.int8)
        target = GQA_ATTENTION_INT8KV
        args = (*inputs, core.key_scale, core.value_scale, core.scale, bool(merge))
    fused = qgraph.insert_call(target, args, anchor.next, like=core.sdpa)
    fused.meta[keys.NAMESPACE] = dict(keys.get(core.sdpa))
    for key in ("stack_trace", "nn_module_stack"):
        if key in core.sdpa.meta:
            fused.meta[key] = core.sdpa.meta[key]
    anchor = fused
    for node, index in replaced:
        with graph.inserting_after(anchor):
            item = graph.call_function(operator.getitem, (fused, index))
        item.meta["val"] = fused.meta["val"][index]
        anchor = item
        node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in core_nodes)
    for node in reversed(merge):
        graph.erase_node(node)
    graph.erase_node(core.sdpa)  # explicitly: FX counts sdpa as impure (its dropout), so DCE keeps it


def int8_cache_scales(qgraph: QGraph) -> dict[str, Tensor]:
    """For a graph lowered with an int8 cache: each past input (placeholder name) → its per-channel
    scale ``[1, KV, 1, D]`` (``present = past`` on that grid; dequantized ``q · scale``)."""
    scales = {}
    for node in qgraph.graph.nodes:
        if patterns.is_op(node, {GQA_ATTENTION_INT8KV}):
            past_k, past_v, k_scale, v_scale = node.args[3:7]
            scales[past_k.name] = qgraph.get_constant(k_scale)
            scales[past_v.name] = qgraph.get_constant(v_scale)
    return scales


def fuse_attention(qgraph: QGraph) -> FuseAttentionReport:
    """Apply :class:`FuseAttentionPass` in place; returns its report."""
    FuseAttentionPass()(qgraph, PassContext(show_progress=False))
    return qgraph.info[keys.INFO_ATTENTION]
