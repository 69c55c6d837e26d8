"""Which ONNX kernel each folded quantized linear (or embedding lookup) becomes — the translations'
rule (:mod:`.translations`), read off the folded QGraph before it is translated."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompile.ir import QGraph, keys
from qcompile.ops.qlinear import QEMBEDDING, QLINEAR_OPS, QLINEAR_W


@dataclass(frozen=True)
class LinearExport:
    """One quantized linear (or embedding lookup) and the ONNX kernel it became."""

    module: str
    role: str
    scheme: str
    kernel: str  # MatMulNBits | MatMulInteger | DequantizeLinear+MatMul | GatherBlockQuantized | …


def quantized_activation(scheme: str) -> bool:
    """A scheme string (``w4g128s-a8``) whose activation part is quantized (not ``a16``)."""
    return "-a" in scheme and not scheme.endswith("-a16")


def kernel_for(node: fx.Node) -> str:
    """The ONNX kernel a folded ``qcompile::`` node becomes."""
    if node.target is QEMBEDDING:
        blocked = node.args[4] == 4 or _is_blocked(node.args[1])
        return "GatherBlockQuantized" if blocked else "Gather+DequantizeLinear"
    if node.target is QLINEAR_W:
        blocked = node.args[5] == 4 or _is_blocked(node.args[1])
        return "MatMulNBits" if blocked else "DequantizeLinear+MatMul"
    _, _, xz, _, _, wz, _, bits, _, group = node.args
    if bits == 4:
        return "MatMulNBits"
    if group == 0 and wz is None and xz is None:
        return "MatMulInteger"
    return "DequantizeLinear+MatMul"


def _is_blocked(w: fx.Node) -> bool:
    val = w.meta.get("val")
    return val is not None and val.dtype == torch.uint8 and val.dim() == 3


def linear_exports(qgraph: QGraph) -> list[LinearExport]:
    """Every folded quantized linear / lookup of ``qgraph``, in graph order."""
    rows = []
    for node in qgraph.graph.nodes:
        if node.op == "call_function" and (node.target in QLINEAR_OPS or node.target is QEMBEDDING):
            ann = keys.get(node)
            role, scheme = str(ann.get(keys.ROLE, "linear")), str(ann.get(keys.QUANT, ""))
            rows.append(LinearExport(str(ann.get(keys.MODULE, node.name)), role, scheme, kernel_for(node)))
    return rows
