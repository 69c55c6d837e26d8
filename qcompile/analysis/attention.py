"""What a decode step's attention core looks like in ATen — matched once, used by the analysis (where
the keys and values enter the cache) and by the ``fuse_attention`` lowering.

A core is ``sdpa(q, repeat_kv(cat([past_k, k_new], -2)), repeat_kv(cat([past_v, v_new], -2)), mask)``
with transformers' ``repeat_kv`` (``x[:, :, None].expand(B, KV, n_rep, T, D).reshape(B, H, T, D)``)
and the bottom-right aligned causal mask ``kv_pos <= q_pos`` (``kv_pos = arange(P + S)``, ``q_pos =
arange(S) + P``). :func:`match_attention_core` returns the parts or raises :class:`NoMatch` with the
reason; :func:`strip_repeat_kv` and :func:`match_cache_concat` are its pieces.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import Tensor

from qcompile import ops
from qcompile.analysis import patterns

aten = torch.ops.aten

_SDPA = aten.scaled_dot_product_attention.default
_CAT = aten.cat.default
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
    # int8 cache (kv_cache_bits annotations): the per-channel scale constants [1, KV, 1, D]; new_key / new_value
    # are then the float tensors *before* their quantize → dequantize
    key_scale: fx.Node | None = None
    value_scale: fx.Node | None = None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def tensor_val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def size_expr(value: Any) -> sympy.Expr | None:
    """A size as a sympy expression: an int, a SymInt, or a node whose ``meta["val"]`` is one."""
    value = tensor_val(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    return None


def same_size(a: Any, b: Any) -> bool:
    ea, eb = size_expr(a), size_expr(b)
    return ea is not None and eb is not None and sympy.expand(ea - eb) == 0


def tensor_shape(node: fx.Node) -> tuple:
    val = tensor_val(node)
    if not isinstance(val, torch.Tensor):
        raise NoMatch(f"`{node.name}` has no shape in meta['val']")
    return tuple(val.shape)


def _strip_empty_concat(node: fx.Node) -> fx.Node:
    """``cat([empty, x])`` → ``x``: transformers' ``DynamicCache`` starts from a 1-D empty tensor,
    which ``torch.cat`` skips (its legacy rule), so the concat is ``x`` itself."""
    if not patterns.is_op(node, {_CAT}):
        return node
    kept = [t for t in node.args[0] if tensor_shape(t) != (0,)]
    return kept[0] if len(kept) == 1 and len(node.args[0]) > 1 else node


def match_cache_concat(node: fx.Node, what: str) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``(cat, past, new)`` for ``cat([past, new], -2)`` of 4-D ``[B, KV, T, D]`` tensors."""
    if not patterns.is_op(node, {_CAT}):
        raise NoMatch(f"{what} `{node.name}` ({node.target}) is not a cache concat cat([past, new], -2)")
    tensors, dim = node.args[0], _arg(node, 1, "dim", 0)
    rank = len(tensor_shape(node))
    if rank != 4 or dim % rank != 2 or len(tensors) != 2:
        raise NoMatch(f"{what} `{node.name}` is not a two-input concat along -2 of a 4-D cache")
    return node, _strip_empty_concat(tensors[0]), tensors[1]


def strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, int, set[fx.Node]]:
    """``(source, n_rep, chain)`` for transformers' ``repeat_kv``: ``x[:, :, None].expand(B, KV, n_rep,
    T, D).reshape(B, KV·n_rep, T, D)`` (with its full slices and clone); ``n_rep = 1`` and no chain
    when ``node`` is not one."""
    if not patterns.is_op(node, patterns.RESHAPE_OPS):
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
    src, expanded, out = tensor_shape(cur), tensor_shape(expand), tensor_shape(node)
    n_rep = expanded[2] if len(expanded) == 5 else None
    if not isinstance(n_rep, int) or len(src) != 4 or len(out) != 4:
        raise NoMatch(
            f"repeat_kv at `{node.name}`: expected [B, KV, T, D] → [B, KV, n_rep, T, D] → [B, H, T, D]"
        )
    heads_ok = isinstance(src[1], int) and out[1] == src[1] * n_rep
    dims_ok = all(same_size(a, b) for a, b in ((src[0], out[0]), (src[2], out[2]), (src[3], out[3])))
    if not (heads_ok and dims_ok):
        raise NoMatch(f"repeat_kv at `{node.name}`: {src} → {out} is not kv head j serving heads j·{n_rep} …")
    return cur, n_rep, chain


def _one_axis(shape: tuple, axis: int) -> bool:
    """Every dim is 1 except (possibly) ``axis`` (negative, counted from the right)."""
    return all(same_size(d, 1) for i, d in enumerate(shape) if i != len(shape) + axis)


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
    le = _walk_back(mask, patterns.BROADCAST_OPS)
    if patterns.is_op(le, {aten.le.Tensor}):
        kv_side, q_side = le.args
    elif patterns.is_op(le, {aten.ge.Tensor}):
        q_side, kv_side = le.args
    else:
        raise NoMatch(f"mask `{mask.name}` comes from `{le.name}` ({le.target}), not kv_pos <= q_pos")
    if not (_one_axis(tensor_shape(kv_side), -1) and _one_axis(tensor_shape(q_side), -2)):
        raise NoMatch(f"mask `{le.name}`: key positions must lie on the last axis, query positions on -2")
    total, kv_offset = _arange_plus(_walk_back(kv_side, patterns.LAYOUT_OPS))
    q_len, past = _arange_plus(_walk_back(q_side, patterns.LAYOUT_OPS))
    seq = tensor_shape(query)[2]
    if not same_size(kv_offset, 0):
        raise NoMatch(f"mask `{le.name}`: key positions start at {kv_offset}, not 0")
    if not same_size(q_len, seq):
        raise NoMatch(f"mask `{le.name}`: query positions arange({q_len}) do not span the query length {seq}")
    mask_shape = tensor_shape(mask)
    if len(mask_shape) != 4 or not (same_size(mask_shape[2], seq) and same_size(mask_shape[3], total)):
        raise NoMatch(f"mask `{mask.name}` {mask_shape} is not [B | 1, 1 | H, S, T]")
    p, s, t = size_expr(past), size_expr(seq), size_expr(total)
    if p is None or s is None or t is None or sympy.expand(p + s - t) != 0:
        raise NoMatch(f"mask `{le.name}`: key positions arange({total}) ≠ past {past} + query length {seq}")
    if not (same_size(total, key_len) or any(same_size(past, c) for c in cache_lens)):
        raise NoMatch(f"mask `{le.name}`: its past length {past} is not a cache length of this graph")


def _cache_quantizer(
    node: fx.Node, constant: Callable[[fx.Node], Tensor] | None
) -> tuple[fx.Node, fx.Node | None]:
    """``(x, scale)`` when ``node`` is ``dequantize(quantize(x, s, 0, -128, 127), s, 0)`` with constant
    per-channel ``s`` ``[1, KV, 1, D]`` — the int8 cache entry the quantize pass writes and
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
    k_src, k_rep, k_chain = strip_repeat_kv(key)
    v_src, v_rep, v_chain = strip_repeat_kv(value)
    key_cat, past_key, new_key = match_cache_concat(k_src, "key")
    value_cat, past_value, new_value = match_cache_concat(v_src, "value")
    new_key, key_scale = _cache_quantizer(new_key, constant)
    new_value, value_scale = _cache_quantizer(new_value, constant)
    if (key_scale is None) != (value_scale is None):
        raise NoMatch("only one of keys / values is quantized; GroupQueryAttention stores both or neither")
    if key_scale is not None and not all(p.op == "placeholder" for p in (past_key, past_value)):
        raise NoMatch("an int8 cache needs the past keys / values to be graph inputs (they become int8)")
    q_shape, k_shape, cache_shape = tensor_shape(query), tensor_shape(new_key), tensor_shape(key_cat)
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
    if not same_size(q_shape[2], k_shape[2]):
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


def kv_cache_entry(operand: Any, kv_heads: int, head_dim: int) -> fx.Node | None:
    """The ``[B, KV, S, D]`` tensor entering the KV cache behind an sdpa key or value operand: through
    transformers' ``repeat_kv`` and, in a decode step, the cache concat (its ``new`` half); without a
    cache, the tensor attention reads before ``repeat_kv``. None when the layout is not that."""
    node = _walk_back(operand, set())
    try:
        node = _walk_back(strip_repeat_kv(node)[0], set())
        if patterns.is_op(node, {_CAT}):
            node = match_cache_concat(node, "entry")[2]
    except NoMatch:
        return None
    shape = patterns.val_shape(node) if isinstance(node, fx.Node) else ()
    return node if len(shape) == 4 and shape[1] == kv_heads and shape[3] == head_dim else None
