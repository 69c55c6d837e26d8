"""MatMulNBits' ``accuracy_level`` after export: 4 lets ORT's CPU kernel quantize the activation to
int8 per block (fast, with a small error of its own), 1 keeps it fp32 (the reference's W4A16). A
MatMulNBits whose input the recipe already quantized (W4A8, W4A4) stays at level 1: level 4 would
round that activation a second time (see :func:`.translations.make_qlinear_wa`)."""

from __future__ import annotations

import os
from typing import Any

import onnx

from qcompile.backends.onnx.graph_edit import set_attr

# ORT's session config entry that sets the accuracy level of MatMulNBits it fuses from
# DequantizeLinear(INT4) → MatMul (the ``int4_format = "qdq"`` files, :mod:`.qdq_format`).
ACCURACY_LEVEL_CONFIG = "session.qdq_matmulnbits_accuracy_level"


def set_accuracy_level_in_place(model: onnx.ModelProto, level: int) -> int:
    """Set the level of every weight-only MatMulNBits of ``model``; returns how many were set."""
    producer = {o: n for n in model.graph.node for o in n.output}
    changed = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not reads_dequantized_integers(node, producer):
            set_attr(node, "accuracy_level", level)
            changed += 1
    return changed


def with_accuracy_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    """``model`` itself when every MatMulNBits already runs at ``level`` (or none reads a float
    activation), else a copy with the weight-only ones set to it."""
    current = {
        next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }
    if current <= {level}:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    set_accuracy_level_in_place(copy, level)
    return copy


def set_accuracy_level(src: str | os.PathLike, dst: str | os.PathLike, level: int) -> int:
    """Copy a written file with the weight-only MatMulNBits at ``level`` (choose speed or exactness
    without exporting again). Returns the number of nodes set."""
    model = onnx.load(str(src))
    changed = set_accuracy_level_in_place(model, level)
    onnx.save(model, str(dst))
    return changed


def reads_dequantized_integers(node: onnx.NodeProto, producer: dict[str, Any]) -> bool:
    """``node``'s input is ``Mul(Cast(q) [- Cast(zp)], scale)`` with ``q`` cast to int8 just before: an
    activation the exported graph quantized (the ``quantize`` / ``dequantize`` translations)."""
    mul = producer.get(node.input[0])
    if mul is None or mul.op_type != "Mul":
        return False
    for name in mul.input:
        src = producer.get(name)
        if src is not None and src.op_type == "Sub":
            src = producer.get(src.input[0])
        if src is None or src.op_type != "Cast":
            continue
        q = producer.get(src.input[0])
        to = next((a.i for a in q.attribute if a.name == "to"), None) if q is not None else None
        if q is not None and q.op_type == "Cast" and to in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            return True
    return False
