"""``onnx.export``: the translation pass, a folded QGraph → an in-memory :class:`.model.OnnxModel`.

Route: re-export the folded graph module with ``torch.export`` (dynamic dims), then
``torch.onnx.export`` with the ``qcompile::`` ops' ONNX implementations from the op registry
(:func:`.translations.translation_table`) — ATen ops go through torch.onnx's own library. Weight-only
4-bit linears become ORT's ``MatMulNBits`` directly (rather than ``DequantizeLinear(int4) → MatMul``
and relying on ORT's fusion): the packed layout is the one ``fold_qdq`` writes, the ragged last block
(576 = 4·128 + 64) is native to it, and the accuracy level is fixed in the model instead of in each
session's options.

A decode step (``qgraph.info["decoder"]``) gets the names ORT-GenAI-style tools expect: ``input_ids``,
``past_key_values.{i}.key/value`` → ``logits``, ``present.{i}.key/value``, with named dynamic dims
``batch``, ``sequence``, ``past_sequence``; it is traced on inputs built from its cache layout. Any
other graph is traced on the first of the context's sample inputs, every dim dynamic.

MatMulNBits ``accuracy_level``: 4 (default) lets ORT's CPU kernel quantize the activation to int8
per block and use integer dot products — the fast path (measured on SmolLM2, BENCHMARKS.md) at a
small error of its own (≈0.5–1 % relative on one product); 1 keeps the activation fp32, exactly the
W4A16 the reference computes (use it to check parity).
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch.export import Dim

from qcompile.backends.onnx.facts import ONNX_MODEL
from qcompile.backends.onnx.linears import linear_exports
from qcompile.backends.onnx.model import OnnxModel
from qcompile.backends.onnx.translations import translation_table
from qcompile.frontend.decoder import CacheLayout, example_decoder_inputs
from qcompile.ir import QGraph, keys
from qcompile.ops import GQA_ATTENTION_INT8KV
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass

NAME = "onnx.export"
DECODER_DIM_NAMES = {(0, 0): "batch", (0, 1): "sequence", (1, 2): "past_sequence"}


@dataclass
class Signature:
    """How the graph is traced and what the model's inputs, outputs and dims are called."""

    example: list[Any]  # flat inputs to trace with
    dynamic: tuple | None  # per flat input {axis: Dim} (None: Dim.AUTO everywhere)
    input_names: list[str] | None = None  # default: the placeholders' names
    output_names: list[str] | None = None  # default: ``logits`` (or output_0), output_1, …
    dim_names: dict[tuple[int, int], str] = field(default_factory=dict)  # (input, axis) -> name
    layout: CacheLayout | None = None


def signature(qgraph: QGraph, ctx: PassContext) -> Signature:
    """A decode step's names and dims from its cache layout; any other graph from a sample input."""
    layout = qgraph.info.get(keys.INFO_DECODER)
    if layout is not None:
        past = [n for n in qgraph.graph.nodes if n.op == "placeholder"][1:]
        cache_dtype = past[0].meta["val"].dtype if past else layout.dtype  # int8 after fuse_attention
        layout = replace(layout, dtype=cache_dtype)
        example = qgraph.flatten_inputs(example_decoder_inputs(layout))
        return Signature(
            example,
            layout.dynamic_shapes(),
            layout.input_names(),
            layout.output_names(),
            dict(DECODER_DIM_NAMES),
            layout,
        )
    if not ctx.sample_inputs:
        raise PassError(
            NAME,
            "the graph is not a decode step, so it is traced on a sample input, and the context has none; "
            "pass sample_inputs=[(x, ...)] (qcompile.lower) or example_inputs (quantize)",
        )
    sample = ctx.sample_inputs[0]
    return Signature(qgraph.flatten_inputs(sample if isinstance(sample, tuple) else (sample,)), None)


@register_pass
class OnnxExportPass(Pass):
    """Translate a folded QGraph into an :class:`.model.OnnxModel` (module docstring)."""

    name: ClassVar[str] = NAME
    kind = "lowering"
    requires = (facts.FOLDED,)
    ensures = (ONNX_MODEL,)

    @dataclass
    class Options:
        opset: int = 21  # 21: blocked DequantizeLinear, int4 types
        accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations in-kernel (fast), 1 = fp32
        optimize: bool = True  # the onnxscript optimizer (constant folding, dead code) after export

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        sig = signature(qgraph, ctx)
        program = _torch_onnx_export(qgraph, sig, self.options)
        _name_values(program.model, qgraph, sig)
        model = OnnxModel(
            program.model_proto,
            self.options.opset,
            self.options.accuracy_level,
            layout=sig.layout,
            cache_scales=_cache_scales(qgraph) if sig.layout is not None else None,
            linears=linear_exports(qgraph),
        )
        _check_kernels(model)
        report = {
            "nodes": len(model.graph.node),
            "initializers": len(model.graph.initializer),
            "op_counts": model.op_counts(),
            "kernels": dict(collections.Counter(lin.kernel for lin in model.linears)),
            "decode_step": model.is_decode_step,
            "int8_cache": model.cache_scales is not None,
        }
        summary = f"{report['nodes']} ONNX nodes, {report['initializers']} initializers; " + (
            ", ".join(f"{k} × {v}" for k, v in report["kernels"].items()) or "no quantized linears"
        )
        return PassResult(model, changed=True, report=report, summary=summary)


def _torch_onnx_export(qgraph: QGraph, sig: Signature, options: Any) -> Any:
    exported = _torch_export(qgraph, sig)
    try:
        return torch.onnx.export(
            exported,
            dynamo=True,
            opset_version=options.opset,
            custom_translation_table=translation_table(options.accuracy_level),
            optimize=options.optimize,
            verbose=False,
        )
    except Exception as exc:
        raise PassError(
            NAME,
            f"torch.onnx.export failed: {type(exc).__name__}: {exc}\n"
            "A qcompile op without an ONNX implementation needs one in backends/onnx/translations.py "
            "(qcompile.ops.registry.missing('onnx') lists them).",
        ) from exc


def _torch_export(qgraph: QGraph, sig: Signature) -> torch.export.ExportedProgram:
    """Re-export the (flat-calling) graph module with dynamic dims (default: every tensor dim)."""
    dynamic = sig.dynamic
    if dynamic is None:
        dynamic = tuple(
            {i: Dim.AUTO for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
            for t in sig.example
        )
    try:
        with torch.no_grad():
            return torch.export.export(
                qgraph.graph_module, tuple(sig.example), dynamic_shapes=dynamic, strict=False
            )
    except Exception as exc:
        raise PassError(
            NAME, f"torch.export of the folded graph failed: {type(exc).__name__}: {exc}"
        ) from exc


def _cache_scales(qgraph: QGraph) -> list[np.ndarray] | None:
    """An int8 cache's per-channel scales ``[1, KV, 1, D]``, one per cache input in input order (read
    off the ``gqa_attention_int8kv`` ops), or None for a float cache."""
    by_input = {}
    for node in qgraph.graph.nodes:
        if node.target is GQA_ATTENTION_INT8KV:
            past_k, past_v, k_scale, v_scale = node.args[3:7]
            by_input[past_k.name] = qgraph.get_constant(k_scale).numpy()
            by_input[past_v.name] = qgraph.get_constant(v_scale).numpy()
    if not by_input:
        return None
    past = [n.name for n in qgraph.graph.nodes if n.op == "placeholder"][1:]
    return [by_input[name] for name in past]


def _check_kernels(model: OnnxModel) -> None:
    wanted = sum(1 for lin in model.linears if lin.kernel == "MatMulNBits")
    found = model.op_counts().get("MatMulNBits", 0)
    if found != wanted:
        raise PassError(NAME, f"{wanted} linears should be MatMulNBits but the model has {found}")


def _name_values(model: Any, qgraph: QGraph, sig: Signature) -> None:
    """Give graph inputs/outputs and their symbolic dims readable names (on the ``onnx_ir`` model)."""
    placeholders = [n.name for n in qgraph.graph.nodes if n.op == "placeholder"]
    in_names = sig.input_names or placeholders
    out_names = sig.output_names or _default_output_names(qgraph, len(model.graph.outputs))
    for value, name in zip(model.graph.inputs, in_names, strict=False):
        value.name = name
    for value, name in zip(model.graph.outputs, out_names, strict=False):
        value.name = name
    renames = {}
    for (i, axis), dim_name in sig.dim_names.items():
        dim = model.graph.inputs[i].shape[axis]
        if not isinstance(dim, int) and dim.value is not None:
            renames[dim.value] = dim_name
    if renames:
        _rename_dims(model, renames)


def _default_output_names(qgraph: QGraph, n: int) -> list[str]:
    spec = qgraph.out_spec
    first = "logits" if spec is not None and "logits" in str(spec.context) else "output_0"
    return [first] + [f"output_{i}" for i in range(1, n)]


def _rename_dims(model: Any, renames: dict[str, str]) -> None:
    import onnx_ir as ir

    values = list(model.graph.inputs) + list(model.graph.outputs)
    for node in model.graph:
        values.extend(node.outputs)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")

    def rename(dim: Any) -> Any:
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            return ir.SymbolicDim(pattern.sub(lambda m: renames[m.group(1)], dim.value))
        return dim

    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([rename(d) for d in value.shape])
