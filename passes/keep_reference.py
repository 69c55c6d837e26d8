"""``keep_reference``: keep a copy of the graph as it is now in the context, for a later pass to
check its result against (a target's verification, e.g. ``onnx.verify``, compares the finished
artifact with the graph before lowering). Changes nothing."""

from __future__ import annotations

from qcompile.ir import QGraph, keys
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassResult, register_pass


@register_pass
class KeepReference(Pass):
    name = "keep_reference"
    kind = "analysis"
    ensures = (facts.REFERENCE,)

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        ctx.state[keys.STATE_REFERENCE] = qgraph.copy()
        return PassResult(
            qgraph, changed=False, report={}, summary="a copy of the graph kept as the reference"
        )
