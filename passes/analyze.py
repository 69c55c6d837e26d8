"""``analyze``: the structural analysis pass (annotates; changes no numbers)."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from qcompile.analysis.analyzer import analyze
from qcompile.analysis.summary import format_structure
from qcompile.ir import QGraph
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassResult, register_pass


@register_pass
class AnalyzePass(Pass):
    """Find linears, norms, residual stream, attention and MLP blocks; write node.meta["qcompile"]."""

    name: ClassVar[str] = "analyze"
    kind = "analysis"
    ensures = (facts.STRUCTURE,)

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        st = analyze(qgraph)
        report = {
            "layers": st.num_layers,
            "linears": dict(Counter(s.role for s in st.linears.values())),
            "norms": dict(Counter(n.kind for n in st.norms.values())),
            "attention_blocks": len(st.attentions),
            "mlp_blocks": len(st.mlps),
            "lm_head": st.lm_head,
            "tied_embedding": st.tied_embedding,
            "residual_writers": len(st.residual.writers) if st.residual else 0,
        }
        return PassResult(qgraph, changed=False, report=report, summary=format_structure(st, qgraph))
