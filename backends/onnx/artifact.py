"""``OnnxArtifact``: what ``qcompile.lower(..., target="onnx")`` returns — the finished in-memory
model and the pipeline that made it. Nothing is on disk until :meth:`OnnxArtifact.save`, which writes
the one file and returns the :class:`.report.ExportReport`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qcompile.backends.onnx.model import OnnxModel
from qcompile.backends.onnx.report import ExportReport, export_report
from qcompile.errors import PassError
from qcompile.pipeline.contract import PipelineResult


@dataclass
class OnnxArtifact:
    model: OnnxModel
    pipeline: PipelineResult
    options: Any = None  # the target's ExportOptions

    @classmethod
    def from_pipeline(cls, ir: Any, pipeline: PipelineResult, options: Any) -> OnnxArtifact:
        if not isinstance(ir, OnnxModel):
            ran = ", ".join(name for name, _ in pipeline.results) or "none"
            raise PassError(
                "onnx.export",
                f"the pipeline ended with a {type(ir).__name__}, not an ONNX model (passes run: {ran}; "
                f"disabled: {', '.join(pipeline.disabled) or 'none'}); onnx.export cannot be disabled",
            )
        return cls(ir, pipeline, options)

    def save(self, path: str | os.PathLike) -> ExportReport:
        """Write the model to ``path`` (the only write of the whole export) and report on it."""
        size = self.model.save(path)
        return export_report(self.model, self.pipeline, str(path), size)

    def report(self) -> ExportReport:
        """The report of the model as it would be written (no path, no size yet)."""
        return export_report(self.model, self.pipeline, "", 0)
