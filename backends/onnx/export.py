"""``export_onnx``: a QGraph → an ONNX file ONNX Runtime runs (torch.onnx dynamo exporter).

Route: fold the Q/DQ graph (``fold_qdq``: packed int4/int8 constants, ``qcompile::qlinear_*`` ops),
re-export the folded graph module with ``torch.export`` (dynamic dims), then ``torch.onnx.export``
with the translations of :mod:`qcompile.backends.onnx.translations` for the ``qcompile::`` ops —
ATen ops go through torch.onnx's own library. Weight-only 4-bit linears become ORT's
``MatMulNBits`` directly (rather than ``DequantizeLinear(int4) → MatMul`` and relying on ORT's fusion):
the packed layout is the one ``fold_qdq`` writes, the ragged last block (576 = 4·128 + 64) is
native to it, and the accuracy level is fixed in the file instead of in each session's options.

MatMulNBits ``accuracy_level`` (:class:`ExportOptions`): 4 (default) lets ORT's CPU kernel quantize
the activation to int8 per block and use integer dot products — the fast path (measured on
SmolLM2, see BENCHMARKS.md) at a small error of its own (≈0.5–1 % relative on one product);
1 keeps the activation fp32, exactly the W4A16 the reference computes (use it to check parity).
"""

from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx as fx
from torch.export import Dim

from qcompile import ops
from qcompile.backends.onnx.translations import translation_table
from qcompile.ir import QGraph, keys
from qcompile.ops.qlinear import QEMBEDDING, QLINEAR_OPS, QLINEAR_W
from qcompile.passes.fold_qdq import FoldQDQPass
from qcompile.pipeline.contract import PassContext


class OnnxExportError(RuntimeError):
    """The export failed; the message names the step and the way out."""


@dataclass
class ExportOptions:
    """How the ONNX file is written.

    Attributes:
        opset: ONNX opset (21: blocked DequantizeLinear, int4 types).
        accuracy_level: MatMulNBits' accuracy level (module docstring): 4 = int8 activations inside
            the kernel (fast on CPU), 1 = fp32 activations (exact W4A16).
        optimize: run the onnxscript optimizer (constant folding, dead code) after export.
        input_names / output_names: names of the flat graph inputs / outputs (default: the
            placeholder names; ``logits`` then ``output_i``).
        dim_names: friendly names for the symbolic input dims, by (input index, axis).
        int4_format: ``matmulnbits`` (ORT's contrib op, accuracy level in the file) or ``qdq``
            (standard ``DequantizeLinear(INT4) → MatMul``, which ORT fuses back; accuracy level from
            the session config, see :mod:`qcompile.backends.onnx.qdq_format`).
        dynamic_shapes: per flat input, ``{axis: torch.export.Dim}`` (shared Dims tie axes together,
            e.g. one batch and one past length for every cache tensor); default ``Dim.AUTO`` on
            every axis.
        fuse_attention: decode-step exports (:func:`export_decoder`) replace each layer's attention
            core (cache concat, repeat_kv, causal mask, sdpa) by one ``GroupQueryAttention``
            (:mod:`qcompile.backends.onnx.attention`); ``export_onnx`` itself does not lower.
        pack_projections: merge linears that read one activation (q/k/v, gate/up) into one kernel
            call and a ``Split`` (:mod:`qcompile.backends.onnx.optimize`; exact).
        rms_norm_div: write RMSNorm's ``rsqrt`` as ``x / Sqrt(v)`` so ORT fuses it into one
            ``SimplifiedLayerNormalization`` kernel, and each residual Add + RMSNorm as one
            ``SkipSimplifiedLayerNormalization`` (rounding-level change).
        share_kv_buffer: decode steps with fused attention take the past length as an input
            (``past_sequence_length``) so a runtime can pass one fixed-size buffer as both past and
            present and ``GroupQueryAttention`` appends in place (:class:`.runtime.KVCache`).
        fuse_rotary: decode steps with fused attention move RoPE into ``GroupQueryAttention``
            (``do_rotary``, a cos/sin cache of ``max_position_embeddings`` rows from the graph's own
            ``inv_freq``, in float64) when the graph's RoPE matches transformers' ``rotate_half``.
        verify: decode steps are run once in ORT (accuracy level 1) against the reference QGraph
            on random inputs; the error is in the summary, and with float activations an error
            over 1e-3 relative fails the export.
    """

    opset: int = 21
    accuracy_level: int = 4
    optimize: bool = True
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    dim_names: dict[tuple[int, int], str] = field(default_factory=dict)
    dynamic_shapes: tuple | None = None
    int4_format: Literal["matmulnbits", "qdq"] = "matmulnbits"
    fuse_attention: bool = True
    pack_projections: bool = True
    rms_norm_div: bool = True
    share_kv_buffer: bool = True
    fuse_rotary: bool = True
    verify: bool = True

    def with_ort_rewrites(self, enabled: bool) -> ExportOptions:
        """A copy with every post-export ORT rewrite (:mod:`.optimize`) switched on or off."""
        return replace(
            self,
            pack_projections=enabled,
            rms_norm_div=enabled,
            share_kv_buffer=enabled,
            fuse_rotary=enabled,
        )


@dataclass
class LinearExport:
    """One quantized linear (or embedding lookup) and the ONNX kernel it became."""

    module: str
    role: str
    scheme: str
    kernel: str  # MatMulNBits | MatMulInteger | DequantizeLinear+MatMul


@dataclass
class ExportReport:
    """What was written: ops, size, the fate of every quantized linear."""

    path: str
    file_bytes: int
    opset: int
    accuracy_level: int
    op_counts: dict[str, int]
    linears: list[LinearExport]
    float_matmuls: int  # MatMul / Gemm left in float (attention products, unquantized linears)
    inputs: list[tuple[str, list[Any], str]]
    outputs: list[tuple[str, list[Any], str]]
    fold_summary: str = ""
    int4_format: str = "matmulnbits"
    rewrites: str = ""
    verification: str = ""

    def kernels(self) -> dict[str, int]:
        return dict(collections.Counter(lin.kernel for lin in self.linears))

    def summary(self) -> str:
        mib = self.file_bytes / 2**20
        top = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: -kv[1])[:12])
        lines = [
            f"wrote {self.path} ({mib:.1f} MiB, opset {self.opset})",
            f"  inputs:  {_list_values(self.inputs)}",
            f"  outputs: {_list_values(self.outputs)}",
            f"  ops: {sum(self.op_counts.values())} nodes — {top}",
        ]
        kernels = ", ".join(f"{k} × {v}" for k, v in self.kernels().items()) or "none (float model)"
        lines.append(f"  quantized linears/lookups: {len(self.linears)} → {kernels}")
        if any(lin.kernel == "MatMulNBits" for lin in self.linears) and self.int4_format == "qdq":
            lines.append(
                "  int4 weights as DequantizeLinear(INT4) → MatMul (ORT fuses to MatMulNBits; accuracy level "
                "from session config session.qdq_matmulnbits_accuracy_level)"
            )
        elif any(lin.kernel == "MatMulNBits" for lin in self.linears):
            note = "int8 activations in-kernel" if self.accuracy_level == 4 else "fp32 activations"
            if any(quantized_activation(lin.scheme) for lin in self.linears):
                note += "; level 1 where the recipe quantized the activation"
            lines.append(f"  MatMulNBits accuracy_level={self.accuracy_level} ({note})")
        for lin in self.linears[:8]:
            lines.append(f"    {lin.module or '?':<40} {lin.role:<8} {lin.scheme:<14} → {lin.kernel}")
        if len(self.linears) > 8:
            lines.append(f"    … {len(self.linears) - 8} more")
        lines.append(f"  float MatMul/Gemm left: {self.float_matmuls}")
        if self.fold_summary:
            lines.append(f"  fold_qdq: {self.fold_summary}")
        if self.rewrites:
            lines.append(f"  {self.rewrites}")
        if self.verification:
            lines.append(f"  {self.verification}")
        return "\n".join(lines)

    def refresh(self) -> None:
        """Re-read size, op counts and inputs from the file (after a rewrite of it)."""
        import onnx

        model = onnx.load(self.path, load_external_data=False)
        self.file_bytes = Path(self.path).stat().st_size
        self.op_counts = dict(collections.Counter(node.op_type for node in model.graph.node))
        self.float_matmuls = self.op_counts.get("MatMul", 0) + self.op_counts.get("Gemm", 0)

        def dims(v: Any) -> list[str]:
            return [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim]

        def dtype(v: Any) -> str:
            return onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name.upper()

        self.inputs = [(v.name, dims(v), dtype(v)) for v in model.graph.input]
        self.outputs = [(v.name, dims(v), dtype(v)) for v in model.graph.output]


def quantized_activation(scheme: str) -> bool:
    """A scheme string (:mod:`qcompile.quant.scheme`) whose activation part is quantized (not ``a16``)."""
    return "-a" in scheme and not scheme.endswith("-a16")


def _list_values(values: list[tuple[str, list[Any], str]], show: int = 3) -> str:
    text = ", ".join(f"{n} [{', '.join(map(str, shape))}] {t.lower()}" for n, shape, t in values[:show])
    return text + (f", … ({len(values) - show} more)" if len(values) > show else "")


def export_onnx(
    qgraph: QGraph,
    example_inputs: tuple,
    path: str | os.PathLike,
    *,
    opset: int = 21,
    accuracy_level: int = 4,
    options: ExportOptions | None = None,
    decode_step: bool = False,
    max_positions: int | None = None,
) -> ExportReport:
    """Export ``qgraph`` (float or quantized, folded or not) to ``path``; returns what was written.

    ``example_inputs`` are positional inputs in the captured signature (nested tuples allowed, e.g.
    a KV cache); every tensor dim is exported dynamic where the graph allows. The caller's QGraph
    is not modified (folding happens on a copy). ``decode_step`` (with fused attention) enables the
    shared-KV-buffer rewrite, and ``max_positions`` RoPE inside attention (:func:`export_decoder`
    sets both); every chosen rewrite runs in one pass over the written file.
    """
    opts = options or ExportOptions(opset=opset, accuracy_level=accuracy_level)
    graph, fold_summary = _folded_copy(qgraph)
    flat = graph.flatten_inputs(tuple(example_inputs))
    exported = _torch_export(graph, flat, opts.dynamic_shapes)
    try:
        program = torch.onnx.export(
            exported,
            dynamo=True,
            opset_version=opts.opset,
            custom_translation_table=translation_table(opts.accuracy_level),
            optimize=opts.optimize,
            verbose=False,
        )
    except Exception as exc:
        raise OnnxExportError(
            f"export_onnx: torch.onnx.export failed: {type(exc).__name__}: {exc}\n"
            "An unsupported qcompile op needs a translation in backends/onnx/translations.py."
        ) from exc
    _name_values(program.model, graph, opts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
    report = _report(program.model, graph, path, opts, fold_summary)
    fused = decode_step and opts.fuse_attention
    share = fused and opts.share_kv_buffer
    positions = max_positions if fused and opts.fuse_rotary else None
    if share or positions or opts.pack_projections or opts.rms_norm_div:
        from qcompile.backends.onnx.optimize import rewrite_for_ort

        rewrites = rewrite_for_ort(
            path,
            share_kv=share,
            pack=opts.pack_projections,
            rms_div=opts.rms_norm_div,
            rotary_positions=positions,
        )
        report.rewrites = rewrites.summary()
        report.refresh()
    if opts.int4_format == "qdq":
        from qcompile.backends.onnx.qdq_format import matmulnbits_to_qdq

        matmulnbits_to_qdq(path, path)
        report.int4_format, report.file_bytes = "qdq", path.stat().st_size
    return report


def _folded_copy(qgraph: QGraph) -> tuple[QGraph, str]:
    """A private copy with every quantized linear folded (no-op for float or already-folded graphs)."""
    graph = qgraph.copy()
    unfolded = any(
        n.target is torch.ops.aten.linear.default
        and isinstance(n.args[1], fx.Node)
        and n.args[1].target is ops.DEQUANTIZE
        for n in graph.graph.nodes
    )
    if not unfolded:
        return graph, ""
    result = FoldQDQPass()(graph, PassContext(show_progress=False))
    return result.qgraph, result.summary


def _torch_export(graph: QGraph, flat: list[Any], dynamic: tuple | None) -> torch.export.ExportedProgram:
    """Re-export the (flat-calling) graph module with dynamic dims (default: every tensor dim)."""
    gm = graph.graph_module
    if dynamic is None:
        dynamic = tuple(
            {i: Dim.AUTO for i in range(t.dim())} if isinstance(t, torch.Tensor) else None for t in flat
        )
    try:
        with torch.no_grad():
            return torch.export.export(gm, tuple(flat), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise OnnxExportError(
            f"export_onnx: torch.export of the folded graph failed: {type(exc).__name__}: {exc}"
        ) from exc


def _name_values(model: Any, graph: QGraph, opts: ExportOptions) -> None:
    """Give graph inputs/outputs and their symbolic dims readable names."""
    placeholders = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
    in_names = opts.input_names or placeholders
    out_names = opts.output_names or _default_output_names(graph, len(model.graph.outputs))
    for value, name in zip(model.graph.inputs, in_names, strict=False):
        value.name = name
    for value, name in zip(model.graph.outputs, out_names, strict=False):
        value.name = name
    renames = {}
    for (i, axis), dim_name in opts.dim_names.items():
        dim = model.graph.inputs[i].shape[axis]
        if not isinstance(dim, int) and dim.value is not None:
            renames[dim.value] = dim_name
    if renames:
        _rename_dims(model, renames)


def _default_output_names(graph: QGraph, n: int) -> list[str]:
    spec = graph.out_spec
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


def kernel_for(node: fx.Node) -> str:
    """The ONNX kernel a folded ``qcompile::`` node becomes (the translations' rule)."""
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


def _report(model: Any, graph: QGraph, path: Path, opts: ExportOptions, fold_summary: str) -> ExportReport:
    counts = collections.Counter(node.op_type for node in model.graph)
    linears = []
    for node in graph.graph.nodes:
        if node.op == "call_function" and (node.target in QLINEAR_OPS or node.target is QEMBEDDING):
            ann = keys.get(node)
            role, scheme = str(ann.get(keys.ROLE, "linear")), str(ann.get(keys.QUANT, ""))
            linears.append(LinearExport(str(ann.get(keys.MODULE, node.name)), role, scheme, kernel_for(node)))

    def describe(values: Any) -> list[tuple[str, list[Any], str]]:
        return [(v.name, [str(d) for d in (v.shape or [])], str(v.dtype)) for v in values]

    n_nbits = sum(1 for lin in linears if lin.kernel == "MatMulNBits")
    if counts.get("MatMulNBits", 0) != n_nbits:
        raise OnnxExportError(
            f"export_onnx: {n_nbits} linears should be MatMulNBits but the file has {counts.get('MatMulNBits', 0)}"
        )
    return ExportReport(
        path=str(path),
        file_bytes=path.stat().st_size,
        opset=opts.opset,
        accuracy_level=opts.accuracy_level,
        op_counts=dict(counts),
        linears=linears,
        float_matmuls=counts.get("MatMul", 0) + counts.get("Gemm", 0),
        inputs=describe(model.graph.inputs),
        outputs=describe(model.graph.outputs),
        fold_summary=fold_summary,
    )


def set_accuracy_level(src: str | os.PathLike, dst: str | os.PathLike, level: int) -> int:
    """Copy an exported file with the ``accuracy_level`` of every weight-only MatMulNBits set to
    ``level`` (choose speed or exactness without re-exporting); those that read an activation the
    recipe quantized keep level 1 (see :func:`.translations.make_qlinear_wa`). Returns the number of
    nodes set."""
    import onnx

    model = onnx.load(str(src))
    producer = {o: n for n in model.graph.node for o in n.output}
    changed = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not _reads_dequantized_integers(node, producer):
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
            changed += 1
    onnx.save(model, str(dst))
    return changed


def _reads_dequantized_integers(node: Any, producer: dict[str, Any]) -> bool:
    """``node``'s input is ``Mul(Cast(q) [- Cast(zp)], scale)`` with ``q`` cast to int8 just before: an
    activation the exported graph quantized (the ``quantize`` / ``dequantize`` translations)."""
    import onnx

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
