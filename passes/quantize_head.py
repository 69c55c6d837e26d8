"""``quantize_head``: quantize the output head (lm_head) and the embedding table.

Scheduled by the export command (``export-onnx --lm-head-bits / --embedding-bits``) after the
recipe and before the target's passes; the recipes' per-role quantization annotations will replace
it. The quantize pass leaves ``lm_head`` in float by default (``exclude_roles``) and never touches the
embedding (a gather, not a linear). On a small model they dominate the file: SmolLM2's tied 49152 ×
576 table is 113 MB in fp32, two thirds of a W4A16 export. This pass puts them on the same RTN grid
as the linears:

- ``lm_head``: the ``quantize`` pass run on that role only (weight-only, ``group_size`` groups), so it
  folds into ``qlinear_w`` → MatMulNBits like any linear;
- embedding: ``embedding(W, ids)`` → ``embedding(dequantize(q, s, z, g), ids)``, which ``fold_qdq``
  turns into ``qcompile::qembedding`` (ORT's ``GatherBlockQuantized`` for 4 bits, Gather + dequantize
  for 8). When the table is tied to a quantized lm_head with the same bits, the embedding reads the
  lm_head's dequantize: the tie survives quantization and the packed table is stored once.

The accuracy cost is the caller's to measure (``benchmarks/ort_speed.py`` reports perplexity with and
without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch.fx as fx

from qcompile import ops
from qcompile.analysis.structure import Structure
from qcompile.ir import QGraph, keys
from qcompile.pipeline import facts
from qcompile.pipeline.contract import (
    Pass,
    PassContext,
    PassError,
    PassResult,
    get_pass_class,
    register_pass,
)
from qcompile.quant.rtn import quantize_weight, sqnr_db
from qcompile.quant.scheme import WeightQuantSpec

NAME = "quantize_head"


@dataclass(frozen=True)
class HeadQuantOptions:
    """Bits of the lm_head and of the embedding table (None = keep float), their group size (a
    ragged last group is fine: 576 = 4·128 + 64) and symmetry (a 4-bit embedding must be symmetric)."""

    lm_head_bits: int | None = 4
    embedding_bits: int | None = 4
    group_size: int = 64
    symmetric: bool = True

    def spec(self, bits: int) -> WeightQuantSpec:
        return WeightQuantSpec(bits, self.symmetric, self.group_size)


@register_pass
class QuantizeHeadPass(Pass):
    """Quantize lm_head and/or the embedding (module docstring)."""

    name: ClassVar[str] = NAME
    kind = "quantize"
    requires = (facts.STRUCTURE,)
    Options = HeadQuantOptions

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        report = quantize_head(qgraph, self.options)
        return PassResult(qgraph, changed=bool(report), report=report, summary=format_head_report(report))


def quantize_head(qgraph: QGraph, options: HeadQuantOptions) -> dict[str, Any]:
    """Quantize lm_head and/or the embedding of ``qgraph`` in place; returns what was done (SQNR)."""
    st: Structure | None = qgraph.info.get(keys.INFO_STRUCTURE)
    if st is None:
        raise PassError(NAME, "no structure on the graph; run the analyze pass first")
    report: dict[str, Any] = {}
    if options.lm_head_bits and st.lm_head is not None:
        pass_opts = {
            "weight_bits": options.lm_head_bits,
            "weight_symmetric": options.symmetric,
            "group_size": options.group_size,
            "act_mode": "none",
            "include_roles": ["lm_head"],
            "exclude_roles": [],
        }
        quantize = get_pass_class("quantize")(pass_opts)
        result = quantize(qgraph, PassContext(show_progress=False))  # no calibration: RTN weights only
        report["lm_head"] = result.report["linears"]
    if options.embedding_bits:
        report["embedding"] = [_quantize_embedding(qgraph, st, e.node, options) for e in st.embeddings]
    qgraph.drop_unused_constants()
    qgraph.recompile()
    return report


def _quantize_embedding(
    qgraph: QGraph, st: Structure, name: str, options: HeadQuantOptions
) -> dict[str, Any]:
    node = qgraph.node(name)
    table = node.args[0]
    if not (isinstance(table, fx.Node) and table.op == "get_attr"):
        return {"node": name, "skipped": "table is not a float constant"}
    spec = options.spec(options.embedding_bits)
    if options.embedding_bits == 4 and not options.symmetric:
        raise PassError(
            NAME, "a 4-bit embedding must be symmetric (its ONNX lookup takes no zero points)", name
        )
    tied = _tied_head_dequantize(qgraph, st, table, options)
    if tied is not None:
        node.prepend(tied)  # the lm_head's dequantize sits at the end of the graph; the lookup is first
        deq, shared = tied, True
    else:
        qw = quantize_weight(qgraph.get_constant(table), spec)
        hint = str(table.target)
        consts = [
            qgraph.add_constant(f"{hint}_{sfx}", t, before=table)
            for sfx, t in (("q", qw.q), ("scale", qw.scale), ("zero_point", qw.zero_point))
        ]
        with qgraph.graph.inserting_before(node):
            deq = qgraph.graph.call_function(ops.DEQUANTIZE, (*consts, qw.group_size))
        deq.meta["val"] = table.meta["val"]
        shared = False
    w = qgraph.get_constant(table)
    w_hat = ops.dequantize(*(qgraph.get_constant(a) for a in deq.args[:3]), deq.args[3])
    node.replace_input_with(table, deq)
    keys.set_(node, keys.QUANT, spec.short())
    return {
        "node": name,
        "scheme": spec.short(),
        "shared_with_lm_head": shared,
        "weight_sqnr_db": sqnr_db(w, w_hat),
    }


def _tied_head_dequantize(
    qgraph: QGraph, st: Structure, table: fx.Node, options: HeadQuantOptions
) -> fx.Node | None:
    """The lm_head's weight dequantize when the lm_head reads this very table on the same grid."""
    if st.lm_head is None or options.lm_head_bits != options.embedding_bits:
        return None
    head = qgraph.node(st.lm_head)
    deq = head.args[1]
    if not (isinstance(deq, fx.Node) and deq.target is ops.DEQUANTIZE):
        return None
    site = st.linears[st.lm_head]
    return deq if site.weight == str(table.target) else None


def format_head_report(report: dict[str, Any]) -> str:
    """One line per quantized head part: scheme and weight SQNR."""
    lines = []
    for row in report.get("lm_head", []):
        lines.append(f"lm_head {row['node']}: {row['scheme']}, weight SQNR {row['weight_sqnr_db']:.1f} dB")
    for row in report.get("embedding", []):
        if "skipped" in row:
            lines.append(f"embedding {row['node']}: skipped ({row['skipped']})")
            continue
        tie = ", shares the lm_head's packed table" if row["shared_with_lm_head"] else ""
        lines.append(
            f"embedding {row['node']}: {row['scheme']}, weight SQNR {row['weight_sqnr_db']:.1f} dB{tie}"
        )
    return "\n".join(lines) or "nothing to quantize"
