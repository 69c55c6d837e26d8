"""Facts about the ONNX IR (:class:`.model.OnnxModel`), registered with the pass contract's facts so
the ONNX passes declare and the pass manager checks them like any other
(:mod:`qcompile.pipeline.facts`)."""

from __future__ import annotations

from typing import Any

from qcompile.backends.onnx.graph_edit import users
from qcompile.backends.onnx.model import PAST_PREFIX, OnnxModel
from qcompile.pipeline.facts import Fact, register_fact


def _onnx_model(ir: Any, ctx: Any) -> str | None:
    if isinstance(ir, OnnxModel):
        return None
    return f"the IR is a {type(ir).__name__}, not an ONNX model (run onnx.export first)"


def _decode_step(ir: Any, ctx: Any) -> str | None:
    if (why := _onnx_model(ir, ctx)) is not None:
        return why
    return None if ir.is_decode_step else "the ONNX model is not a decode step (no past_key_values.* inputs)"


def _kv_cache_in_attention(ir: Any, ctx: Any) -> str | None:
    if (why := _decode_step(ir, ctx)) is not None:
        return why
    readers = users(ir.graph)
    for name in (n for n in ir.input_names if n.startswith(PAST_PREFIX)):
        for node in readers.get(name, []):
            gqa = node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"
            if gqa and list(node.input).index(name) in (3, 4):
                continue
            if node.op_type != "Shape":
                return (
                    f"node {node.name!r} ({node.op_type}) reads the cache input {name}; only "
                    "GroupQueryAttention and Shape may (was fuse_attention disabled? then disable "
                    "onnx.share_kv_buffer too)"
                )
    return None


ONNX_MODEL = register_fact(Fact("onnx_model", "an ONNX model (the IR after onnx.export)", _onnx_model))
ONNX_DECODE_STEP = register_fact(
    Fact("onnx_decode_step", "an ONNX decode step with its KV cache as inputs and outputs", _decode_step)
)
KV_CACHE_IN_ATTENTION = register_fact(
    Fact(
        "kv_cache_in_attention",
        "an ONNX decode step whose KV cache only GroupQueryAttention (and Shape) reads",
        _kv_cache_in_attention,
    )
)
