"""Fused attention for decode-step exports: ``qcompile::gqa_attention`` and its ONNX translation.

Why: transformers' attention, captured at ATen level, exports as a decomposition — the cache append
(``cat``), ``repeat_kv`` (``expand`` + ``clone`` of the whole cache per layer), the causal mask built
from ``arange``s, and ``scaled_dot_product_attention`` as Transpose / MatMul / Softmax. In ONNX
Runtime that is ~2,000 small nodes per SmolLM2 decode step and copies of every layer's cache (Kᵀ,
the repeated heads) on every step. This module replaces each layer's attention *core* by one op that
ORT runs as a single kernel.

The op (layout ``[batch, heads, seq, head_dim]``, as the captured graph has it)::

    qcompile::gqa_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor past_k, Tensor past_v,
                            float scale, bool merge_heads=False)
        -> (Tensor out, Tensor present_k, Tensor present_v)
    qcompile::gqa_attention_int8kv(q, k_new, v_new, past_k, past_v, Tensor k_scale, Tensor v_scale,
                                   float scale, bool merge_heads=False) -> (out, present_k, present_v)

- ``q`` ``[B, H, S, D]`` (after RoPE), ``k_new`` / ``v_new`` ``[B, KV, S, D]``, ``past_k`` /
  ``past_v`` ``[B, KV, P, D]`` (``P`` may be 0); ``H`` a multiple of ``KV`` (query head ``h`` reads
  kv head ``h // (H / KV)``, transformers' ``repeat_kv``);
- ``present_k = cat([past_k, k_new], -2)`` (the same for v), ``out`` = softmax(q·Kᵀ·scale + mask)·V
  with the *bottom-right aligned* causal mask: query ``i`` is at absolute position ``P + i`` and
  sees keys ``0 … P + i``. No padding mask: rows are unpadded and equally long (the decode step's
  contract, :mod:`.decoder`). ``out`` is ``[B, H, S, D]``, or ``[B, S, H·D]`` with ``merge_heads``
  (the lowering sets it when the graph's ``transpose(1, 2)`` + ``view`` follow, and drops them);
- the int8 variant (an int8 cache, :mod:`qcompile.passes.quantize_kv`): ``past_*`` / ``present_*``
  are int8, the new rows quantized with the per-channel scales ``[1, KV, 1, D]``, attention over the
  dequantized cache.

The reference implementation runs the ATen ops it replaces (cat, repeat_kv, sdpa with that boolean
mask; the quantize / dequantize of the cache entries), so a lowered graph reproduces the original
numbers.

:class:`FuseAttentionPass` (a ``lowering``) finds each ``scaled_dot_product_attention`` whose key and
value are (the repeat_kv of) ``cat([past, new], -2)`` and whose mask is the causal ``le`` of key
positions ``arange(P + S)`` against query positions ``arange(S) + P``, and rewrites that core;
anything else is left as it is and the report names the node and the reason. It is an export-time
lowering of this backend, not a recipe pass (the op only has an ONNX translation), so it is not in
the pass registry.

ONNX: ``com.microsoft.GroupQueryAttention`` (:func:`gqa_attention_onnx`). Checked on ORT 1.32 CPU
(one thread) against a numpy reference and the QGraph: an empty past (``[B, KV, 0, D]``) is accepted
(prefill), batch > 1 and decode work, and a multi-token step after a past works with batch > 1 only
when the optional ``query_seqlens`` input is given (without it: "batch_size must be 1 when
sequence_length > 1 and past context is given"), so the translation always passes it.

Why GroupQueryAttention and not ONNX's own ``Attention`` (opset 23; ORT runs it with past/present
and bottom-right causal alignment, also checked): ``Attention`` is the faster kernel — 30 layers at
batch 1, 512 cached tokens: 3.9 ms against 4.4 ms — and needs no length inputs (GQA's cost ~11 small
shape nodes per layer, ~0.35 ms a SmolLM2 step), but it needs the whole file at opset 23, and at
opset 23 the exporter's onnxscript optimizer also rewrites RoPE into ``RotaryEmbedding``
(``onnxscript/rewriter/rules/fusion/_rotary_embedding.py``, RotaryEmbedding23Fusion) with a
batch-1 cos/sin cache that ORT 1.32 rejects for batch > 1 ("Inputs 'cos_cache' and 'sin_cache' are
expected to have the same shape as input 'x'"), whichever attention op is used. The project exports
at opset 21, where only GroupQueryAttention exists. (Measured on SmolLM2 W4A16, one thread, batch 1,
512 context: GQA at opset 21 16.2 ms/step, GQA at opset 23 15.4, Attention-23 at opset 23 13.8 — most
of the opset-23 gain is its RMSNorm/RoPE fusions, which break batch > 1.) Those fusions are now done
at opset 21 by :mod:`.optimize` after export — RoPE inside GroupQueryAttention (``do_rotary``), RMSNorm
in the form ORT fuses, the length inputs computed once from ``input_ids`` and shared by every layer,
and a past length input so past and present can be one in-place buffer (the cache copy that
``Attention`` would also pay) — which is why GroupQueryAttention stays.

Limits: head counts and head_dim must be static; every layer's cache has the same length (the decode
step's contract; the file ties them to one ``past_sequence`` dim); no padding mask.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from qcompile import meta as qmeta
from qcompile import ops, patterns
from qcompile.ir import QGraph
from qcompile.pass_base import Pass, PassContext, PassError, PassResult
from qcompile.quantizers import dequantize_ref, quantize_ref

aten = torch.ops.aten

# ---- the op ----------------------------------------------------------------------------------------


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``[B, KV, T, D] -> [B, KV·n_rep, T, D]``, kv head ``j`` serving query heads ``j·n_rep …``
    (transformers' ``repeat_kv``: the same expand + copy, so the numbers are the same)."""
    if n_rep == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


def causal_mask(seq: int, total: int, device: torch.device | None = None) -> Tensor:
    """Boolean ``[1, 1, seq, total]``: query ``i`` (absolute position ``total - seq + i``) sees keys
    ``0 … total - seq + i`` — the bottom-right aligned causal mask of a step after ``total - seq``
    cached tokens (transformers' ``kv_idx <= q_idx``)."""
    kv_pos = torch.arange(total, device=device)
    q_pos = torch.arange(seq, device=device) + (total - seq)
    return (kv_pos[None, :] <= q_pos[:, None])[None, None]


def _attend(q: Tensor, keys: Tensor, values: Tensor, scale: float, merge_heads: bool) -> Tensor:
    """``softmax(q·Kᵀ·scale + causal mask)·V`` over the whole cache, in transformers' ATen ops;
    ``[B, H, S, D]``, or ``[B, S, H·D]`` with ``merge_heads`` (what the graph's ``transpose(1, 2)``
    and ``view`` after attention make of it — a view of the same memory, so the same numbers)."""
    n_rep = q.shape[1] // keys.shape[1]
    mask = causal_mask(q.shape[-2], keys.shape[-2], q.device)
    out = F.scaled_dot_product_attention(
        q, _repeat_kv(keys, n_rep), _repeat_kv(values, n_rep), attn_mask=mask, scale=scale
    )
    if merge_heads:
        b, h, s, d = out.shape
        return out.transpose(1, 2).reshape(b, s, h * d)
    return _heads_inner(out)


@torch.library.custom_op(
    "qcompile::gqa_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k_new, Tensor v_new, Tensor past_k, Tensor past_v, float scale, "
    "bool merge_heads=False) -> (Tensor, Tensor, Tensor)",
)
def gqa_attention(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    scale: float,
    merge_heads: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal grouped-query attention over ``past ++ new``; returns ``(out, present_k, present_v)``
    (``out`` ``[B, S, H·D]`` with ``merge_heads``)."""
    present_k = torch.cat([past_k, k_new], dim=-2)
    present_v = torch.cat([past_v, v_new], dim=-2)
    return _attend(q, present_k, present_v, scale, merge_heads), present_k, present_v


@torch.library.custom_op(
    "qcompile::gqa_attention_int8kv",
    mutates_args=(),
    schema="(Tensor q, Tensor k_new, Tensor v_new, Tensor past_k, Tensor past_v, Tensor k_scale, "
    "Tensor v_scale, float scale, bool merge_heads=False) -> (Tensor, Tensor, Tensor)",
)
def gqa_attention_int8kv(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    k_scale: Tensor,
    v_scale: Tensor,
    scale: float,
    merge_heads: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gqa_attention` over an int8 cache: the new keys/values are quantized per channel
    (``k_scale`` / ``v_scale`` ``[1, KV, 1, D]``, symmetric, [-128, 127]) and appended to the int8
    ``past``; attention reads the whole cache dequantized. The same numbers as the unfused graph's
    ``dequantize(quantize(k_new))`` before ``cat([past, ·])`` when that past holds ``past_k · k_scale``
    (:mod:`qcompile.passes.quantize_kv`)."""
    present_k = torch.cat([past_k, _quantize_cache(k_new, k_scale)], dim=-2)
    present_v = torch.cat([past_v, _quantize_cache(v_new, v_scale)], dim=-2)
    keys, values = _dequantize_cache(present_k, k_scale), _dequantize_cache(present_v, v_scale)
    return _attend(q, keys, values, scale, merge_heads), present_k, present_v


def _quantize_cache(x: Tensor, scale: Tensor) -> Tensor:
    return quantize_ref(x, scale, torch.zeros_like(scale, dtype=torch.int8), -128, 127, 0)


def _dequantize_cache(q: Tensor, scale: Tensor) -> Tensor:
    return dequantize_ref(q, scale, torch.zeros_like(scale, dtype=torch.int8), 0)


def _heads_inner(out: Tensor) -> Tensor:
    """``out`` with sdpa's CPU memory layout: ``[B, H, S, D]`` stored as ``[B, S, H, D]``. The captured
    graph's ``transpose(1, 2).view(B, S, H·D)`` after attention relies on it (a view, not a copy), so
    the op and its fake promise that layout (a no-op when sdpa already returned it)."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@gqa_attention.register_fake
def _gqa_attention_fake(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    scale: float,
    merge_heads: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(
        q.dim() == 4 and k_new.dim() == 4 and past_k.dim() == 4,
        lambda: "qcompile::gqa_attention: q, k_new and past_k must be [batch, heads, seq, head_dim]",
    )
    torch._check(
        q.shape[1] % k_new.shape[1] == 0,
        lambda: f"qcompile::gqa_attention: {q.shape[1]} query heads are not a multiple of {k_new.shape[1]}",
    )
    b, kv, past, d = past_k.shape
    present_k = past_k.new_empty((b, kv, past + k_new.shape[2], d))
    present_v = past_v.new_empty((b, past_v.shape[1], past_v.shape[2] + v_new.shape[2], past_v.shape[3]))
    b, h, s, _ = q.shape
    if merge_heads:
        return q.new_empty((b, s, h * v_new.shape[-1])), present_k, present_v
    out = q.new_empty((b, s, h, v_new.shape[-1])).transpose(1, 2)  # the layout of _heads_inner
    return out, present_k, present_v


@gqa_attention_int8kv.register_fake
def _gqa_attention_int8kv_fake(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    k_scale: Tensor,
    v_scale: Tensor,
    scale: float,
    merge_heads: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(
        past_k.dtype == torch.int8 and past_v.dtype == torch.int8,
        lambda: "qcompile::gqa_attention_int8kv: the past cache must be int8",
    )
    return _gqa_attention_fake(q, k_new, v_new, past_k, past_v, scale, merge_heads)


# The OpOverloads the lowering inserts and the exporter translates (never compared as strings).
GQA_ATTENTION = torch.ops.qcompile.gqa_attention.default
GQA_ATTENTION_INT8KV = torch.ops.qcompile.gqa_attention_int8kv.default


# ---- matching: what a decode step's attention core looks like in ATen -------------------------------

_SDPA = aten.scaled_dot_product_attention.default
_CAT = aten.cat.default
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# Ops that only relabel a position vector's layout (the mask walks through them): they never reorder
# elements of a tensor with one non-1 dim, which is all a position vector ever is here.
_LAYOUT_OPS = _RESHAPES | {
    aten.unsqueeze.default,
    aten.expand.default,
    aten.clone.default,
    aten.alias.default,
}
# What a boolean mask may pass through between its ``le`` and the sdpa (broadcasting only).
_BROADCAST_OPS = {aten.unsqueeze.default, aten.expand.default, aten.clone.default, aten.alias.default}
_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}


class NoMatch(Exception):
    """This sdpa is not a fusable attention core; the message is the reason (for the report)."""


@dataclass(frozen=True)
class AttentionCore:
    """One matched core: ``sdpa(q, repeat_kv(cat([past_k, k_new])), repeat_kv(cat([past_v, v_new])),
    causal_mask)``. ``internal`` are the nodes between the cache concats and the sdpa (repeat_kv);
    once the sdpa is replaced they are dead."""

    sdpa: fx.Node
    query: fx.Node
    new_key: fx.Node
    new_value: fx.Node
    past_key: fx.Node
    past_value: fx.Node
    key_cat: fx.Node
    value_cat: fx.Node
    scale: float
    num_heads: int
    kv_heads: int
    internal: frozenset[fx.Node]
    # int8 cache (quantize_kv): the per-channel scale constants [1, KV, 1, D]; new_key / new_value
    # are then the float tensors *before* their quantize → dequantize
    key_scale: fx.Node | None = None
    value_scale: fx.Node | None = None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _expr(value: Any) -> sympy.Expr | None:
    """A size as a sympy expression: an int, a SymInt, or a node whose ``meta["val"]`` is one."""
    value = _val(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    return None


def _same(a: Any, b: Any) -> bool:
    ea, eb = _expr(a), _expr(b)
    return ea is not None and eb is not None and sympy.expand(ea - eb) == 0


def _shape(node: fx.Node) -> tuple:
    val = _val(node)
    if not isinstance(val, torch.Tensor):
        raise NoMatch(f"`{node.name}` has no shape in meta['val']")
    return tuple(val.shape)


def _strip_empty_concat(node: fx.Node) -> fx.Node:
    """``cat([empty, x])`` → ``x``: transformers' ``DynamicCache`` starts from a 1-D empty tensor,
    which ``torch.cat`` skips (its legacy rule), so the concat is ``x`` itself."""
    if not patterns.is_op(node, {_CAT}):
        return node
    kept = [t for t in node.args[0] if _shape(t) != (0,)]
    return kept[0] if len(kept) == 1 and len(node.args[0]) > 1 else node


def _match_cache_concat(node: fx.Node, what: str) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``(cat, past, new)`` for ``cat([past, new], -2)`` of 4-D ``[B, KV, T, D]`` tensors."""
    if not patterns.is_op(node, {_CAT}):
        raise NoMatch(f"{what} `{node.name}` ({node.target}) is not a cache concat cat([past, new], -2)")
    tensors, dim = node.args[0], _arg(node, 1, "dim", 0)
    rank = len(_shape(node))
    if rank != 4 or dim % rank != 2 or len(tensors) != 2:
        raise NoMatch(f"{what} `{node.name}` is not a two-input concat along -2 of a 4-D cache")
    return node, _strip_empty_concat(tensors[0]), tensors[1]


def _strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, int, set[fx.Node]]:
    """``(source, n_rep, chain)`` for transformers' ``repeat_kv``: ``x[:, :, None].expand(B, KV, n_rep,
    T, D).reshape(B, KV·n_rep, T, D)`` (with its full slices and clone); ``n_rep = 1`` and no chain
    when ``node`` is not one."""
    if not patterns.is_op(node, _RESHAPES):
        return node, 1, set()
    chain = {node}
    cur = node.args[0]
    if patterns.is_op(cur, {aten.clone.default}):
        chain.add(cur)
        cur = cur.args[0]
    if not patterns.is_op(cur, {aten.expand.default}):
        raise NoMatch(f"`{node.name}` reshapes `{cur.name}`, not the expand of transformers' repeat_kv")
    expand = cur
    chain.add(expand)
    cur = expand.args[0]
    while patterns.is_full_slice(cur):
        chain.add(cur)
        cur = cur.args[0]
    if not (patterns.is_op(cur, {aten.unsqueeze.default}) and cur.args[1] in (2, -3)):
        raise NoMatch(f"repeat_kv at `{node.name}`: the expanded axis is not a new axis 2 (`{cur.name}`)")
    chain.add(cur)
    cur = cur.args[0]
    while patterns.is_full_slice(cur):
        chain.add(cur)
        cur = cur.args[0]
    src, expanded, out = _shape(cur), _shape(expand), _shape(node)
    n_rep = expanded[2] if len(expanded) == 5 else None
    if not isinstance(n_rep, int) or len(src) != 4 or len(out) != 4:
        raise NoMatch(
            f"repeat_kv at `{node.name}`: expected [B, KV, T, D] → [B, KV, n_rep, T, D] → [B, H, T, D]"
        )
    heads_ok = isinstance(src[1], int) and out[1] == src[1] * n_rep
    dims_ok = all(_same(a, b) for a, b in ((src[0], out[0]), (src[2], out[2]), (src[3], out[3])))
    if not (heads_ok and dims_ok):
        raise NoMatch(f"repeat_kv at `{node.name}`: {src} → {out} is not kv head j serving heads j·{n_rep} …")
    return cur, n_rep, chain


def _one_axis(shape: tuple, axis: int) -> bool:
    """Every dim is 1 except (possibly) ``axis`` (negative, counted from the right)."""
    return all(_same(d, 1) for i, d in enumerate(shape) if i != len(shape) + axis)


def _arange_plus(node: fx.Node) -> tuple[Any, Any]:
    """``(n, offset)`` for ``arange(n) [+ offset]`` (start 0, step 1); offset 0 when absent."""
    offset: Any = 0
    if patterns.is_op(node, {aten.add.Tensor}):
        a, b = node.args[0], node.args[1]
        if patterns.is_op(b, _ARANGES):
            a, b = b, a
        node, offset = a, b
    if not patterns.is_op(node, _ARANGES):
        raise NoMatch(f"`{node.name}` is not arange(n) + offset")
    start = 0 if node.target is aten.arange.default else node.args[0]
    step = node.args[2] if node.target is aten.arange.start_step else 1
    if start != 0 or step != 1:
        raise NoMatch(f"`{node.name}` is an arange with start {start}, step {step} (want 0, 1)")
    end = node.args[0] if node.target is aten.arange.default else node.args[1]
    return end, offset


def _walk_back(node: Any, ops: set) -> Any:
    while isinstance(node, fx.Node) and (patterns.is_op(node, ops) or patterns.is_full_slice(node)):
        node = node.args[0]
    return node


def _check_causal_mask(mask: Any, query: fx.Node, key_len: Any, cache_lens: list[Any]) -> None:
    """The mask must be ``kv_pos <= q_pos`` with ``kv_pos = arange(P + S)`` on the last axis and
    ``q_pos = arange(S) + P`` on the query axis: bottom-right aligned causal, nothing else (no padding
    or sliding window term). ``P`` must be the cache length (this layer's, or — transformers builds
    one mask for all layers — another layer's cache input, equal by the decode step's contract)."""
    if not isinstance(mask, fx.Node):
        raise NoMatch("no attention mask (an is_causal=True sdpa is top-left aligned: wrong with a past)")
    le = _walk_back(mask, _BROADCAST_OPS)
    if patterns.is_op(le, {aten.le.Tensor}):
        kv_side, q_side = le.args
    elif patterns.is_op(le, {aten.ge.Tensor}):
        q_side, kv_side = le.args
    else:
        raise NoMatch(f"mask `{mask.name}` comes from `{le.name}` ({le.target}), not kv_pos <= q_pos")
    if not (_one_axis(_shape(kv_side), -1) and _one_axis(_shape(q_side), -2)):
        raise NoMatch(f"mask `{le.name}`: key positions must lie on the last axis, query positions on -2")
    total, kv_offset = _arange_plus(_walk_back(kv_side, _LAYOUT_OPS))
    q_len, past = _arange_plus(_walk_back(q_side, _LAYOUT_OPS))
    seq = _shape(query)[2]
    if not _same(kv_offset, 0):
        raise NoMatch(f"mask `{le.name}`: key positions start at {kv_offset}, not 0")
    if not _same(q_len, seq):
        raise NoMatch(f"mask `{le.name}`: query positions arange({q_len}) do not span the query length {seq}")
    mask_shape = _shape(mask)
    if len(mask_shape) != 4 or not (_same(mask_shape[2], seq) and _same(mask_shape[3], total)):
        raise NoMatch(f"mask `{mask.name}` {mask_shape} is not [B | 1, 1 | H, S, T]")
    p, s, t = _expr(past), _expr(seq), _expr(total)
    if p is None or s is None or t is None or sympy.expand(p + s - t) != 0:
        raise NoMatch(f"mask `{le.name}`: key positions arange({total}) ≠ past {past} + query length {seq}")
    if not (_same(total, key_len) or any(_same(past, c) for c in cache_lens)):
        raise NoMatch(f"mask `{le.name}`: its past length {past} is not a cache length of this graph")


def _cache_quantizer(
    node: fx.Node, constant: Callable[[fx.Node], Tensor] | None
) -> tuple[fx.Node, fx.Node | None]:
    """``(x, scale)`` when ``node`` is ``dequantize(quantize(x, s, 0, -128, 127), s, 0)`` with constant
    per-channel ``s`` ``[1, KV, 1, D]`` — the int8 cache entry ``quantize_kv`` writes and
    GroupQueryAttention stores; ``(node, None)`` when it is not quantized at all."""
    if not patterns.is_op(node, {ops.DEQUANTIZE}):
        return node, None
    q, s, z, group = node.args
    why = None
    if not patterns.is_op(q, {ops.QUANTIZE}) or q.args[1:] != (s, z, -128, 127, 0) or group != 0:
        why = "not an int8 quantize → dequantize pair"
    elif constant is None or not (patterns.is_constant(s) and patterns.is_constant(z)):
        why = "its scale / zero point are not constants (a static scale is needed)"
    else:
        shape = tuple(constant(s).shape)
        if len(shape) != 4 or shape[0] != 1 or shape[2] != 1 or bool(constant(z).any()):
            why = f"not symmetric per channel (scale {shape}, want [1, KV, 1, D] with zero points 0)"
    if why is not None:
        raise NoMatch(
            f"the cache entry `{node.name}` is quantized, but {why}: GroupQueryAttention cannot store it"
        )
    return q.args[0], s


def match_attention_core(
    sdpa: fx.Node, cache_lens: list[Any], constant: Callable[[fx.Node], Tensor] | None = None
) -> AttentionCore:
    """Match one sdpa; raises :class:`NoMatch` with the reason when it is not a fusable core.
    ``cache_lens`` are the past lengths of the graph's cache inputs (dim 2 of 4-D placeholders);
    ``constant`` reads a ``get_attr`` node's tensor (to recognise an int8 cache's scales)."""
    if sdpa.target is not _SDPA:
        raise NoMatch(f"{sdpa.target} is not aten.scaled_dot_product_attention.default")
    query, key, value = sdpa.args[:3]
    mask = _arg(sdpa, 3, "attn_mask")
    if _arg(sdpa, 4, "dropout_p", 0.0) != 0.0:
        raise NoMatch("dropout_p ≠ 0")
    if _arg(sdpa, 5, "is_causal", False):
        raise NoMatch("is_causal=True (top-left aligned, not the decode step's bottom-right causal mask)")
    enable_gqa = bool(_arg(sdpa, 7, "enable_gqa", False))
    k_src, k_rep, k_chain = _strip_repeat_kv(key)
    v_src, v_rep, v_chain = _strip_repeat_kv(value)
    key_cat, past_key, new_key = _match_cache_concat(k_src, "key")
    value_cat, past_value, new_value = _match_cache_concat(v_src, "value")
    new_key, key_scale = _cache_quantizer(new_key, constant)
    new_value, value_scale = _cache_quantizer(new_value, constant)
    if (key_scale is None) != (value_scale is None):
        raise NoMatch("only one of keys / values is quantized; GroupQueryAttention stores both or neither")
    if key_scale is not None and not all(p.op == "placeholder" for p in (past_key, past_value)):
        raise NoMatch("an int8 cache needs the past keys / values to be graph inputs (they become int8)")
    q_shape, k_shape, cache_shape = _shape(query), _shape(new_key), _shape(key_cat)
    if len(q_shape) != 4 or not isinstance(q_shape[1], int) or not isinstance(q_shape[3], int):
        raise NoMatch(f"query `{query.name}` {q_shape} is not [B, H, S, D] with static H and D")
    heads, kv_heads = q_shape[1], cache_shape[1]
    if not isinstance(kv_heads, int) or heads % kv_heads != 0:
        raise NoMatch(f"{heads} query heads vs {kv_heads} kv heads: not grouped-query attention")
    n_rep = heads // kv_heads
    if (k_rep, v_rep) != (n_rep, n_rep) and not (enable_gqa and k_rep == v_rep == 1):
        raise NoMatch(
            f"keys/values repeated ×{k_rep}/×{v_rep}, but {heads} heads over {kv_heads} kv heads need ×{n_rep}"
        )
    if not _same(q_shape[2], k_shape[2]):
        raise NoMatch(
            f"query length {q_shape[2]} ≠ new key length {k_shape[2]} (not self-attention over the step)"
        )
    _check_causal_mask(mask, query, cache_shape[2], cache_lens)
    scale = _arg(sdpa, 6, "scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q_shape[3])  # sdpa's default
    return AttentionCore(
        sdpa,
        query,
        new_key,
        new_value,
        past_key,
        past_value,
        key_cat,
        value_cat,
        scale,
        heads,
        kv_heads,
        frozenset(k_chain | v_chain),
        key_scale,
        value_scale,
    )


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


class FuseAttentionPass(Pass):
    """Replace each decode-step attention core by ``qcompile::gqa_attention`` (module docstring).

    Works in place on the QGraph it is given (export applies it to a copy). Changes no numbers beyond
    float reassociation inside sdpa: the op's reference runs the ATen ops it replaces."""

    name: ClassVar[str] = "fuse_attention"
    kind = "lowering"

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        graph = qgraph.graph
        report = FuseAttentionReport(nodes_before=len(graph.nodes))
        cache_lens = [
            _shape(n)[2]
            for n in graph.nodes
            if n.op == "placeholder" and isinstance(_val(n), Tensor) and _val(n).dim() == 4
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
                "(quantize every layer's cache with quantize_kv, or none)",
            )
        if report.fused:
            graph.eliminate_dead_code()  # the masks, repeat_kv copies and cache concats
            qgraph.recompile()
        report.nodes_after = len(graph.nodes)
        qgraph.info[self.name] = report
        return PassResult(qgraph, changed=bool(report.fused), report=asdict(report), summary=report.summary())


def _merged_heads(core: AttentionCore) -> list[fx.Node]:
    """The graph's ``transpose(1, 2)`` and ``view(B, S, H·D)`` after the sdpa (with the no-op views and
    copies transformers puts around them), when they are its only use: the op then returns ``[B, S,
    H·D]`` itself (``merge_heads``) and ORT's kernel output needs no reshape round trip. Empty when
    the pattern is not there."""
    q_shape, v_shape = _shape(core.query), _shape(core.new_value)
    out_shape = (q_shape[0], q_shape[1], q_shape[2], v_shape[3])
    chain: list[fx.Node] = []
    node, transposed = core.sdpa, False
    copies = {aten.clone.default, aten.contiguous.default, aten.alias.default}
    while len(node.users) == 1:
        (node,) = node.users
        shape = _shape(node)
        if patterns.is_op(node, copies) or (
            not transposed
            and patterns.is_op(node, _RESHAPES)
            and len(shape) == 4
            and all(_same(a, b) for a, b in zip(shape, out_shape, strict=True))
        ):
            chain.append(node)  # a copy, or a view to the very shape it had
        elif not transposed and patterns.is_op(node, {aten.transpose.int}):
            if sorted(d % 4 for d in node.args[1:3]) != [1, 2]:
                return []
            chain.append(node)
            transposed = True
        elif transposed and patterns.is_op(node, _RESHAPES) and len(shape) == 3:
            merged = shape[2] == q_shape[1] * v_shape[3]
            same_rows = _same(shape[0], q_shape[0]) and _same(shape[1], q_shape[2])
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
                if _val(past).dtype != torch.int8:
                    past.meta["val"] = torch.empty_like(_val(past), dtype=torch.int8)
        target = GQA_ATTENTION_INT8KV
        args = (*inputs, core.key_scale, core.value_scale, core.scale, bool(merge))
    fused = qgraph.insert_call(target, args, anchor.next, like=core.sdpa)
    fused.meta[qmeta.NAMESPACE] = dict(qmeta.get(core.sdpa))
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
    return qgraph.info[FuseAttentionPass.name]


# ---- ONNX ------------------------------------------------------------------------------------------


def _static_dim(value: Any, axis: int, what: str) -> int:
    shape = getattr(value, "shape", None)
    dim = shape[axis] if shape is not None and len(shape) > axis else None
    if not isinstance(dim, int):
        raise NotImplementedError(
            f"onnx export: qcompile::gqa_attention needs a static {what} (axis {axis} of {shape}); "
            "export with fuse_attention=False"
        )
    return dim


def gqa_attention_int8kv_onnx(
    q: Any,
    k_new: Any,
    v_new: Any,
    past_k: Any,
    past_v: Any,
    k_scale: Any,
    v_scale: Any,
    scale: float,
    merge_heads: bool = False,
) -> tuple[Any, Any, Any]:
    """``qcompile::gqa_attention_int8kv`` → ``GroupQueryAttention`` over an int8 cache
    (``k_quant_type = v_quant_type = "PER_CHANNEL"``, ``kv_cache_bit_width = 8``, scales ``[KV·D]``):
    ORT quantizes the new rows with ``clamp(rint(x / s), -128, 127)`` and attends over the whole cache
    dequantized — checked against the op's reference, tests/test_onnx_kv_cache.py."""
    return gqa_attention_onnx(q, k_new, v_new, past_k, past_v, scale, merge_heads, (k_scale, v_scale))


def gqa_attention_onnx(
    q: Any,
    k_new: Any,
    v_new: Any,
    past_k: Any,
    past_v: Any,
    scale: float,
    merge_heads: bool = False,
    cache_scales: tuple[Any, Any] | None = None,
) -> tuple[Any, Any, Any]:
    """``qcompile::gqa_attention`` → ``com.microsoft.GroupQueryAttention``.

    GQA takes ``[B, S, heads·D]`` activations, so q / k / v are transposed from the op's BHSD and,
    unless the op already returns merged heads (``merge_heads``, the lowering's usual case), the
    output back (ORT's transpose optimizer cancels these against the graph's own ``transpose(1, 2)``
    around attention, pushing them through RoPE onto the shared cos/sin; tested). The lengths it
    wants are computed from shapes:
    ``seqlens_k = P + S - 1`` per row, ``total_sequence_length = P + S``, and ``query_seqlens = S``
    per row — without that last one ORT 1.32's CPU kernel refuses a multi-token step after a past
    with batch > 1 ("batch_size must be 1 when sequence_length > 1 and past context is given").
    """
    from onnx import TensorProto
    from onnxscript import opset21 as op

    from qcompile.backends.onnx import contrib

    heads, head_dim = _static_dim(q, 1, "head count"), _static_dim(q, 3, "head dim")
    kv_heads = _static_dim(k_new, 1, "kv head count")
    int32 = TensorProto.INT32

    def to_bsh(x: Any, n: int) -> Any:
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, n * head_dim]))

    batch = op.Shape(q, start=0, end=1)
    seq = op.Shape(q, start=2, end=3)  # [1] int64
    total = op.Add(op.Shape(past_k, start=2, end=3), seq)
    seqlens_k = op.Cast(op.Tile(op.Sub(total, op.Constant(value_ints=[1])), batch), to=int32)  # [B]
    query_seqlens = op.Cast(op.Tile(seq, batch), to=int32)  # [B]
    total_len = op.Cast(op.Squeeze(total), to=int32)  # scalar
    optional = [None] * 9  # cos_cache … k_norm_weight
    attrs: dict[str, Any] = {}
    if cache_scales is not None:  # inputs 12 and 13: per-channel scales, flat [KV·D]
        flat = op.Constant(value_ints=[-1])
        optional[5:7] = [op.Reshape(cache_scales[0], flat), op.Reshape(cache_scales[1], flat)]
        attrs = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
    out, present_k, present_v = contrib.GroupQueryAttention(
        to_bsh(q, heads),
        to_bsh(k_new, kv_heads),
        to_bsh(v_new, kv_heads),
        past_k,
        past_v,
        seqlens_k,
        total_len,
        *optional,
        query_seqlens,
        num_heads=heads,
        kv_num_heads=kv_heads,
        scale=float(scale),
        **attrs,
    )
    if not merge_heads:  # back to the op's [B, H, S, D]
        out = op.Transpose(
            op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim])), perm=[0, 2, 1, 3]
        )
    return out, present_k, present_v
