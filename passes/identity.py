"""``noop``: a pass that changes nothing.

It exists so the pass manager, instruments and recipes can be exercised (and a dump directory
produced) without any real transformation, e.g. ``[[passes]] name = "noop"`` in a test recipe.
"""

from __future__ import annotations

from qcompile.ir import QGraph
from qcompile.pipeline.contract import Pass, PassContext, PassResult, register_pass


@register_pass
class Noop(Pass):
    name = "noop"
    kind = "analysis"

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        return PassResult(qgraph, changed=False, report={}, summary="nothing to do")
