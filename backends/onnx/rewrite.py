"""The base of the ONNX rewrite passes: each changes how ONNX Runtime computes the model, not what.

A rewrite is a function on the in-memory ``ModelProto`` returning how many places it changed and a
structured report; :class:`OnnxRewrite` makes it a pass of kind ``equivalence`` over
:class:`.model.OnnxModel` with a declared tolerance, so the ``EquivalenceCheck`` instrument runs the
model before and after it in ONNX Runtime (:meth:`.model.OnnxModel.run_flat`) and the ``DumpIR``
instrument writes it out like any QGraph pass.
"""

from __future__ import annotations

from typing import Any, ClassVar

from qcompile.backends.onnx.facts import ONNX_MODEL
from qcompile.backends.onnx.model import OnnxModel
from qcompile.pipeline.contract import Pass, PassContext, PassResult


class OnnxRewrite(Pass):
    """Subclasses set ``name`` (``onnx.<rewrite>``), ``tolerance`` and implement :meth:`rewrite`."""

    kind = "equivalence"
    requires = (ONNX_MODEL,)
    ensures = (ONNX_MODEL,)
    # What the report's count means ("reshape chains collapsed"), for the one-line summary.
    counts: ClassVar[str] = "places rewritten"

    def rewrite(self, model: OnnxModel) -> dict[str, Any]:  # pragma: no cover - interface
        """Change ``model.proto`` in place; return the report, whose ``count`` is the number of
        places changed."""
        raise NotImplementedError

    def changed(self, report: dict[str, Any]) -> bool:
        return report["count"] > 0

    def run(self, ir: OnnxModel, ctx: PassContext) -> PassResult:
        report = self.rewrite(ir)
        summary = f"{report['count']} {self.counts}"
        return PassResult(ir, changed=self.changed(report), report=report, summary=summary)
