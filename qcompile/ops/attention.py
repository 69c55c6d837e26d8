"""Fused grouped-query attention with a KV cache: ``qcompile::gqa_attention`` and its int8-cache variant.

The ops (layout ``[batch, heads, seq, head_dim]``, as the captured graph has it)::

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
  contract, :mod:`qcompile.frontend.decoder`). ``out`` is ``[B, H, S, D]``, or ``[B, S, H·D]`` with
  ``merge_heads`` (the ``fuse_attention`` pass sets it when the graph's ``transpose(1, 2)`` + ``view``
  follow, and drops them);
- the int8 variant (an int8 cache): ``past_*`` / ``present_*`` are int8, the new rows quantized with
  the per-channel scales ``[1, KV, 1, D]``, attention over the dequantized cache.

The reference implementation runs the ATen ops the ``fuse_attention`` pass replaces (cat, repeat_kv,
sdpa with that boolean mask; the quantize / dequantize of the cache entries), so a lowered graph
reproduces the original numbers. Backends map the ops to one kernel (ONNX Runtime:
``com.microsoft.GroupQueryAttention``, :mod:`qcompile.backends.onnx.attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompile.ops.registry import define
from qcompile.quant.rtn import dequantize_ref, quantize_ref

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


@define(
    "gqa_attention",
    "(Tensor q, Tensor k_new, Tensor v_new, Tensor past_k, Tensor past_v, float scale, "
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


@define(
    "gqa_attention_int8kv",
    "(Tensor q, Tensor k_new, Tensor v_new, Tensor past_k, Tensor past_v, Tensor k_scale, "
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
    (KV-cache annotations realised by :mod:`qcompile.passes.quantize`)."""
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
