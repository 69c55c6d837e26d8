"""``ExportReport``: what was written, as data — the model's inputs, outputs and ops, the fate of every
quantized linear, and every lowering pass's own report — rendered as text only by :meth:`summary`."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import onnx

from qcompile.backends.onnx.linears import LinearExport, quantized_activation
from qcompile.backends.onnx.model import OnnxModel
from qcompile.pipeline.contract import PipelineResult

Value = tuple[str, list[str], str]  # name, dims, dtype


@dataclass
class ExportReport:
    """What was written (see the module docstring)."""

    path: str
    file_bytes: int
    opset: int
    accuracy_level: int
    int4_format: str
    op_counts: dict[str, int]
    linears: list[LinearExport]
    inputs: list[Value]
    outputs: list[Value]
    # every pass of the pipeline that produced the model, by name: its structured report
    passes: dict[str, dict[str, Any]] = field(default_factory=dict)
    disabled: list[str] = field(default_factory=list)  # passes a DisablePasses instrument kept out

    @property
    def float_matmuls(self) -> int:
        """MatMul / Gemm left in float (attention products, unquantized linears)."""
        return self.op_counts.get("MatMul", 0) + self.op_counts.get("Gemm", 0)

    @property
    def verification(self) -> dict[str, Any] | None:
        """The ``onnx.verify`` report (max error against the reference), when that pass ran."""
        return self.passes.get("onnx.verify")

    def kernels(self) -> dict[str, int]:
        return dict(collections.Counter(lin.kernel for lin in self.linears))

    def rewrites(self) -> dict[str, dict[str, Any]]:
        """The reports of the ONNX rewrite passes that ran (``onnx.*`` but the export and checks)."""
        skip = {"onnx.export", "onnx.verify"}
        return {k: v for k, v in self.passes.items() if k.startswith("onnx.") and k not in skip}

    def summary(self) -> str:
        lines = [
            f"wrote {self.path} ({self.file_bytes / 2**20:.1f} MiB, opset {self.opset})",
            f"  inputs:  {_list_values(self.inputs)}",
            f"  outputs: {_list_values(self.outputs)}",
            f"  ops: {sum(self.op_counts.values())} nodes — {_top(self.op_counts)}",
        ]
        kernels = ", ".join(f"{k} × {v}" for k, v in self.kernels().items()) or "none (float model)"
        lines.append(f"  quantized linears/lookups: {len(self.linears)} → {kernels}")
        lines += self._kernel_notes()
        for lin in self.linears[:8]:
            lines.append(f"    {lin.module or '?':<40} {lin.role:<8} {lin.scheme:<14} → {lin.kernel}")
        if len(self.linears) > 8:
            lines.append(f"    … {len(self.linears) - 8} more")
        lines.append(f"  float MatMul/Gemm left: {self.float_matmuls}")
        fold = self.passes.get("fold_qdq")
        if fold:
            lines.append(
                f"  fold_qdq: {fold['folded']} folded, weights {fold['weight_bytes_before'] / 2**20:.2f} MiB → "
                f"{fold['weight_bytes_after'] / 2**20:.2f} MiB"
            )
        rewrites = "; ".join(
            f"{name.removeprefix('onnx.')} {_rewrite_text(r)}" for name, r in self.rewrites().items()
        )
        lines.append(f"  ONNX passes: {rewrites or 'none'}")
        if self.disabled:
            lines.append(f"  disabled: {', '.join(self.disabled)}")
        if self.verification:
            v = self.verification
            lines.append(
                f"  verified: ORT (accuracy level {v['accuracy_level']}) vs the reference QGraph, max relative "
                f"L2 error {v['max_relative_error']:.1e} over logits and caches"
                + ("" if v["enforced"] else " (quantized activations: reported, not enforced)")
            )
        return "\n".join(lines)

    def _kernel_notes(self) -> list[str]:
        if not any(lin.kernel == "MatMulNBits" for lin in self.linears):
            return []
        if self.int4_format == "qdq":
            return [
                "  int4 weights as DequantizeLinear(INT4) → MatMul (ORT fuses to MatMulNBits; accuracy level "
                "from session config session.qdq_matmulnbits_accuracy_level)"
            ]
        note = "int8 activations in-kernel" if self.accuracy_level == 4 else "fp32 activations"
        if any(quantized_activation(lin.scheme) for lin in self.linears):
            note += "; level 1 where the recipe quantized the activation"
        return [f"  MatMulNBits accuracy_level={self.accuracy_level} ({note})"]


def _rewrite_text(report: dict[str, Any]) -> str:
    if "skipped" in report:
        return f"skipped ({report['skipped']})"
    extra = report.get("packed")
    return str(report.get("count", "")) + (
        f" ({', '.join(f'{k} × {v}' for k, v in extra.items())})" if extra else ""
    )


def _top(counts: dict[str, int], n: int = 12) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:n])


def _list_values(values: list[Value], show: int = 3) -> str:
    text = ", ".join(f"{n} [{', '.join(shape)}] {t}" for n, shape, t in values[:show])
    return text + (f", … ({len(values) - show} more)" if len(values) > show else "")


def _values(values: Any) -> list[Value]:
    def dims(v: Any) -> list[str]:
        return [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim]

    def dtype(v: Any) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name

    return [(v.name, dims(v), dtype(v)) for v in values]


def export_report(model: OnnxModel, pipeline: PipelineResult, path: str, file_bytes: int) -> ExportReport:
    """The report of a model written to ``path`` by the pipeline ``pipeline``."""
    return ExportReport(
        path=path,
        file_bytes=file_bytes,
        opset=model.opset,
        accuracy_level=model.accuracy_level,
        int4_format=model.int4_format,
        op_counts=model.op_counts(),
        linears=list(model.linears),
        inputs=_values(model.graph.input),
        outputs=_values(model.graph.output),
        passes={name: result.report for name, result in pipeline.results},
        disabled=list(pipeline.disabled),
    )
