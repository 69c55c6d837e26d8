"""ONNX translation of the attention ops (:mod:`qcompile.ops.attention`): ``com.microsoft.GroupQueryAttention``.

Checked on ORT 1.32 CPU (one thread) against a numpy reference and the QGraph: an empty past
(``[B, KV, 0, D]``) is accepted (prefill), batch > 1 and decode work, and a multi-token step after a
past works with batch > 1 only when the optional ``query_seqlens`` input is given (without it:
"batch_size must be 1 when sequence_length > 1 and past context is given"), so the translation
always passes it.

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

from typing import Any


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
