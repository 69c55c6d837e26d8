"""``quantize``: the convert step — realise every quantization spec the ``annotate`` pass wrote.

The pass has no scheme of its own: it reads ``node.meta["qcompile"]["qspec"]``
(:mod:`qcompile.quant.spec`) and checks every annotation against the graph and the calibration
statistics *before* it changes anything, so a refusal (a precise error naming the node and its spec)
leaves the graph as it was. Then, in this order:

1. **Linears** (:class:`~qcompile.quant.spec.LinearQuantSpec`, the lm_head included when annotated):

   - weight: the float constant W is replaced by ``qcompile.dequantize(q, scale, zero_point, g)`` on
     constants computed offline — RTN (:func:`qcompile.quant.rtn.quantize_weight`, with the optional
     clip search on the calibration inputs) or GPTQ (:func:`qcompile.quant.gptq.gptq_quantize`, GPTQ
     Alg. 1, with the Hessian ``XᵀX`` from ``calibrate(hessian = true)``; with clip search the group
     grids are RTN's clipped ones). Linears go one at a time; once every linear reading an ``XᵀX``
     is quantized, the Hessian is dropped from the calibration statistics (new stats objects; the
     shared ones are never mutated). The float constant is removed when nothing else reads it.
   - input activation (unless ``none``): dynamic per token, ``choose_qparams_per_token → quantize →
     dequantize``; or static per tensor with a scale from the calibrated range. Linears reading the
     same tensor with the same scheme (q, k, v; gate, up) share one QDQ chain.

2. **Embedding tables** (:class:`~qcompile.quant.spec.EmbeddingQuantSpec`): ``embedding(W, ids)`` →
   ``embedding(dequantize(q, s, z, g), ids)`` (RTN), the form ``fold_qdq`` turns into
   ``qcompile::qembedding``. A table tied to an lm_head quantized on the same weight grid reads the
   lm_head's dequantize instead: the tie survives quantization and the table is stored once.

3. **KV cache** (:class:`~qcompile.quant.spec.KVCacheQuantSpec`): each annotated key / value entry
   ``[B, KV, S, D]`` is replaced by ``dequantize(quantize(x, s, 0, -128, 127))`` before it enters the
   cache (or attention), one static scale per channel (kv head × head dim), ``s = max|x| / 127.5``
   (a channel never seen nonzero gets scale 1). The ranges are observed here, on the calibration
   batches run through the graph as it is *after* the weights were quantized — statistics from an
   earlier ``calibrate`` would be stale (SmoothQuant's v → o smoothing divides the value channels,
   QuaRot's R2 rotates them). Per-channel key scales follow KIVI (key outliers sit in fixed channels;
   after RoPE a channel pair shares a rotation).

Every inserted node gets ``meta["val"]`` from the ops' fake implementations; each quantized node gets
``node.meta["qcompile"]["quant"]`` = its scheme string (:mod:`qcompile.quant.scheme`). The report
gives per-linear weight SQNR and, with calibration samples, output SQNR (``X Wᵀ`` vs ``X̂ Ŵᵀ``, bias
left out), the count of linears per scheme, the embedding's weight SQNR and, per KV entry, the SQNR on
the calibration sample rows and the fraction of values at the clip limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass, replace
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile import ops
from qcompile.analysis.structure import AttentionSite, EmbeddingSite, LinearSite, Structure
from qcompile.ir import QGraph, keys
from qcompile.passes.quantize.qdq import QDQWriter
from qcompile.passes.quantize.report import (
    CacheQuantReport,
    LinearQuantReport,
    build_report,
    render_summary,
)
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass
from qcompile.quant.calibration import CalibrationError, calibrate
from qcompile.quant.gptq import GPTQError, gptq_quantize
from qcompile.quant.rtn import QuantizedWeight, fake_quant_activation, quantize_weight, sqnr_db
from qcompile.quant.scheme import ActQuantSpec
from qcompile.quant.spec import EmbeddingQuantSpec, KVCacheQuantSpec, LinearQuantSpec

NO_CALIBRATION = "run the calibrate pass before quantize, or annotate act_mode = 'dynamic_per_token'"
NO_HESSIAN = "set hessian = true on the calibrate pass (before quantize), or annotate weight_method = 'rtn'"
NO_KV_BATCHES = "pass calibration=... to qcompile.quantize, or annotate without kv_cache_bits"


@dataclass
class _Plan:
    """Every annotation checked against the graph, before anything changes."""

    linears: list[tuple[LinearSite, fx.Node, LinearQuantSpec, Any]] = field(default_factory=list)
    embeddings: list[tuple[EmbeddingSite, fx.Node, EmbeddingQuantSpec]] = field(default_factory=list)
    caches: list[tuple[AttentionSite, str, fx.Node, KVCacheQuantSpec]] = field(default_factory=list)
    left: list[dict[str, Any]] = field(default_factory=list)  # not quantized, with the reason


@register_pass
class QuantizePass(Pass):
    """Convert every annotated linear, embedding and KV-cache entry (see the module docstring)."""

    name: ClassVar[str] = "quantize"
    kind = "quantize"
    requires = (facts.STRUCTURE, facts.SPECS_ANNOTATED)

    @dataclass
    class Options:
        """How the convert step measures, not what it quantizes (that is the annotations')."""

        kv_sample_rows: int = 256  # rows kept per KV-cache entry (seeded reservoir) for the error report

        def __post_init__(self) -> None:
            if self.kv_sample_rows < 0:
                raise ValueError(f"kv_sample_rows must be >= 0, got {self.kv_sample_rows}")

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        st: Structure | None = qgraph.info.get(keys.INFO_STRUCTURE)
        if st is None:
            raise PassError(self.name, "no structure on the graph; run the analyze pass first")
        plan = self._plan(qgraph, st, ctx)
        rewriter = QDQWriter(qgraph)
        hessians = _HessianRelease(ctx, {n.name: n for n in qgraph.graph.nodes})
        rows = []
        for site, node, spec, stats in plan.linears:
            rows.append(self._quantize_linear(qgraph, rewriter, node, site, spec, stats))
            hessians.done(site.node)
        embedding_rows = [self._quantize_embedding(qgraph, rewriter, st, *item) for item in plan.embeddings]
        cache_rows = self._quantize_caches(qgraph, rewriter, plan.caches, ctx)
        rewriter.drop_unused_weights()
        qgraph.recompile()
        qgraph.info[keys.INFO_QUANTIZE] = (
            {r.node: r.scheme for r in rows}
            | {r["node"]: r["scheme"] for r in embedding_rows}
            | {r.node: r.scheme for r in cache_rows}
        )
        report = build_report(rows, plan.left, embedding_rows, cache_rows)
        changed = bool(rows or embedding_rows or cache_rows)
        return PassResult(qgraph, changed=changed, report=report, summary=render_summary(report, rows))

    # ---- planning: every check before the first rewrite ----------------------------------------------

    def _plan(self, qgraph: QGraph, st: Structure, ctx: PassContext) -> _Plan:
        by_name = {n.name: n for n in qgraph.graph.nodes}
        self._check_annotated_nodes(qgraph, _edges(st, by_name))
        plan = _Plan()
        self._plan_linears(plan, st, by_name, ctx.state.get(keys.STATE_CALIBRATION))
        self._plan_embeddings(plan, st, by_name)
        self._plan_caches(plan, st, by_name, bool(ctx.calibration))
        return plan

    def _plan_linears(self, plan: _Plan, st: Structure, by_name: dict, calibration: dict | None) -> None:
        for site in st.linears.values():
            node = by_name[site.node]
            spec = keys.get(node).get(keys.QSPEC)
            reason = _linear_left_alone(site, node, spec)
            if reason is not None:
                plan.left.append({"node": site.node, "role": site.role, "reason": reason})
                continue
            stats = calibration.get(site.node) if calibration is not None else None
            self._check_calibration(site, spec, stats, calibration is not None)
            plan.linears.append((site, node, spec, stats))

    def _plan_embeddings(self, plan: _Plan, st: Structure, by_name: dict) -> None:
        for site in st.embeddings:
            node = by_name[site.node]
            spec = keys.get(node).get(keys.QSPEC)
            if spec is None:
                continue
            table = node.args[0]
            if not (isinstance(table, fx.Node) and table.op == "get_attr"):
                reason = "table is not a float constant (already quantized?)"
                plan.left.append({"node": site.node, "role": "embedding", "reason": reason})
                continue
            plan.embeddings.append((site, node, spec))

    def _plan_caches(self, plan: _Plan, st: Structure, by_name: dict, has_batches: bool) -> None:
        for site, entry, node in _cache_entries(st, by_name):
            spec = keys.get(node).get(keys.QSPEC)
            if spec is None:
                continue
            if any(u.target is ops.QUANTIZE for u in node.users):
                plan.left.append({"node": node.name, "role": entry, "reason": "already quantized"})
                continue
            if not has_batches:
                raise PassError(
                    self.name,
                    f"{entry} cache entry annotated {spec.describe()}: its per-channel ranges are observed "
                    f"on calibration batches, but the context has none; {NO_KV_BATCHES}",
                    node.name,
                )
            plan.caches.append((site, entry, node, spec))

    def _check_annotated_nodes(self, qgraph: QGraph, edges: dict[str, type]) -> None:
        """Every annotation sits on an edge of its kind (a pass between annotate and quantize may have
        moved what the annotation describes)."""
        for node in qgraph.graph.nodes:
            spec = node.meta.get(keys.NAMESPACE, {}).get(keys.QSPEC)
            if spec is None or isinstance(spec, edges.get(node.name, ())):
                continue
            what = f"a {edges[node.name].__name__} edge" if node.name in edges else "nothing quantizable"
            raise PassError(
                self.name,
                f"annotated {spec.describe()} ({type(spec).__name__}) but the analysis finds {what} here; "
                "re-run annotate after the pass that changed the graph",
                node.name,
            )

    def _check_calibration(
        self, site: LinearSite, spec: LinearQuantSpec, stats: Any, calibrated: bool
    ) -> None:
        """Refuse, before the graph is touched, a linear whose spec needs calibration it lacks."""
        why = "there are no calibration statistics" if not calibrated else "calibration has no entry for it"
        if spec.needs_act_range and stats is None:
            raise PassError(
                self.name,
                f"annotated {spec.describe()}: static activations take their scale from the calibrated "
                f"range, but {why}; {NO_CALIBRATION}",
                site.node,
            )
        if spec.needs_act_range and not spec.act.symmetric:
            if getattr(stats, "channel_min", None) is None or getattr(stats, "channel_max", None) is None:
                raise PassError(
                    self.name,
                    f"annotated {spec.describe()}: asymmetric static activations need channel_min / "
                    "channel_max from calibration, which its statistics lack; re-run the calibrate pass",
                    site.node,
                )
        if spec.needs_hessian and getattr(stats, "xtx", None) is None:
            if stats is not None:
                why = "its calibration statistics have no Hessian XᵀX"
            raise PassError(
                self.name,
                f"annotated {spec.describe()}: GPTQ needs XᵀX of its input, but {why}; {NO_HESSIAN}",
                site.node,
            )
        n = site.in_features
        samples, xtx = getattr(stats, "samples", None), getattr(stats, "xtx", None)
        for what, t, ok in (
            ("samples", samples, samples is None or (samples.dim() == 2 and samples.shape[1] == n)),
            ("xtx", xtx, xtx is None or tuple(xtx.shape) == (n, n)),
        ):
            if not ok:
                raise PassError(
                    self.name,
                    f"calibration {what} have shape {tuple(t.shape)} but the linear has {n} inputs; "
                    "was the graph changed after calibration? re-run the calibrate pass",
                    site.node,
                )

    # ---- linears -----------------------------------------------------------------------------------

    def _quantize_linear(
        self,
        qgraph: QGraph,
        rewriter: QDQWriter,
        node: fx.Node,
        site: LinearSite,
        spec: LinearQuantSpec,
        stats: Any,
    ) -> LinearQuantReport:
        w = qgraph.get_constant(site.weight)
        samples = getattr(stats, "samples", None) if stats is not None else None
        qw = self._quantize_weight(w, spec, stats, site)
        w_hat = qw.dequantize()
        rewriter.replace_weight(node, qw)
        aspec = spec.act
        static_range = _static_range(stats, aspec) if spec.needs_act_range else None
        if aspec.enabled:
            rewriter.quantize_input(node, aspec, static_range)
        keys.set_(node, keys.QUANT, spec.scheme())
        out_sqnr = None
        if samples is not None and samples.numel():
            x = samples.to(device=w.device, dtype=w.dtype)
            out_sqnr = sqnr_db(x @ w.T, fake_quant_activation(x, aspec, static_range) @ w_hat.T)
        clip = float(qw.clip_ratio.mean()) if qw.clip_ratio is not None else None
        return LinearQuantReport(
            site.node, site.role, site.layer, spec.scheme(), sqnr_db(w, w_hat), out_sqnr, clip, spec.method
        )

    def _quantize_weight(
        self, w: torch.Tensor, spec: LinearQuantSpec, stats: Any, site: LinearSite
    ) -> QuantizedWeight:
        """W quantized by the spec's method: RTN (clip search on the calibration inputs) or GPTQ."""
        if spec.gptq is None:
            samples = getattr(stats, "samples", None) if stats is not None else None
            xtx = getattr(stats, "xtx", None) if stats is not None else None
            return quantize_weight(w, spec.weight, samples=samples, xtx=xtx)
        g = spec.gptq
        try:
            return gptq_quantize(
                w,
                stats.xtx,
                stats.n_tokens,
                spec.weight,
                block_size=g.block_size,
                damp=g.damp,
                act_order=g.act_order,
            )
        except GPTQError as exc:
            raise PassError(self.name, f"GPTQ failed ({spec.describe()}): {exc}", site.node) from exc

    # ---- embedding -----------------------------------------------------------------------------------

    def _quantize_embedding(
        self,
        qgraph: QGraph,
        rewriter: QDQWriter,
        st: Structure,
        site: EmbeddingSite,
        node: fx.Node,
        spec: EmbeddingQuantSpec,
    ) -> dict[str, Any]:
        table = node.args[0]
        w = qgraph.get_constant(table)
        tied = _tied_head_dequantize(qgraph, st, table, spec)
        if tied is not None:
            node.prepend(tied)  # the lm_head's dequantize sits at the end of the graph; the lookup is first
            deq = tied
        else:
            deq = rewriter.dequantized_table(node, table, quantize_weight(w, spec.weight))
        w_hat = ops.dequantize(*(qgraph.get_constant(a) for a in deq.args[:3]), deq.args[3])
        node.replace_input_with(table, deq)
        rewriter.replaced.append(table)
        keys.set_(node, keys.QUANT, spec.scheme())
        return {
            "node": site.node,
            "scheme": spec.scheme(),
            "shared_with_lm_head": tied is not None,
            "weight_sqnr_db": sqnr_db(w, w_hat),
        }

    # ---- KV cache -------------------------------------------------------------------------------------

    def _quantize_caches(
        self, qgraph: QGraph, rewriter: QDQWriter, caches: list, ctx: PassContext
    ) -> list[CacheQuantReport]:
        """Observe every entry's per-channel range on the graph as it is now, then fake-quantize it."""
        if not caches:
            return []
        try:
            calibrate(
                qgraph,
                ctx.calibration,
                sample_rows=self.options.kv_sample_rows,
                seed=ctx.seed,
                progress=ctx.show_progress,
                linears=[],
                cache_entries=[node.name for _, _, node, _ in caches],
            )
        except CalibrationError as exc:
            raise PassError(self.name, str(exc).removeprefix("calibrate: ")) from exc
        rows = []
        for site, entry, node, spec in caches:
            stats = keys.get(node)[keys.KV_STATS]
            sqnr, clipped = rewriter.quantize_cache_entry(node, stats, spec)
            rows.append(
                CacheQuantReport(
                    site.layer, site.attention_node, entry, node.name, spec.scheme(), sqnr, clipped
                )
            )
        return rows


def _static_range(stats: Any, aspec: ActQuantSpec) -> tuple[float, float]:
    """The calibrated range [lo, hi] of the linear's input: ±tensor_absmax (symmetric), else the
    extremes of the per-channel min/max."""
    if aspec.symmetric:
        absmax = float(stats.tensor_absmax)
        return -absmax, absmax
    return float(stats.channel_min.min()), float(stats.channel_max.max())


def _linear_left_alone(site: LinearSite, node: fx.Node, spec: Any) -> str | None:
    if spec is None:
        return "not annotated"
    w = node.args[1]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target) == site.weight):
        return "weight is no longer a float constant (already quantized?)"
    return None


def _cache_entries(st: Structure, by_name: dict[str, fx.Node]) -> list[tuple[AttentionSite, str, fx.Node]]:
    """Every KV-cache entry the analysis found: (attention, "key" | "value", node)."""
    found = []
    for site in st.attentions:
        for entry, name in (("key", site.key_source), ("value", site.value_source)):
            if name is not None and name in by_name:
                found.append((site, entry, by_name[name]))
    return found


def _edges(st: Structure, by_name: dict[str, fx.Node]) -> dict[str, type]:
    """Node name -> the spec class an annotation there must have."""
    edges: dict[str, type] = {name: LinearQuantSpec for name in st.linears}
    edges |= {site.node: EmbeddingQuantSpec for site in st.embeddings}
    edges |= {node.name: KVCacheQuantSpec for _, _, node in _cache_entries(st, by_name)}
    return edges


def _tied_head_dequantize(
    qgraph: QGraph, st: Structure, table: fx.Node, spec: EmbeddingQuantSpec
) -> fx.Node | None:
    """The lm_head's weight dequantize when the lm_head reads this very table on the same grid."""
    if st.lm_head is None or st.linears[st.lm_head].weight != str(table.target):
        return None
    head = qgraph.node(st.lm_head)
    deq = head.args[1]
    if not (isinstance(deq, fx.Node) and deq.target is ops.DEQUANTIZE):
        return None
    head_spec = keys.get(head).get(keys.QSPEC)
    return deq if isinstance(head_spec, LinearQuantSpec) and head_spec.weight == spec.weight else None


class _HessianRelease:
    """Drops each ``XᵀX`` from the calibration statistics once every linear reading it is quantized.

    Linears that read one tensor (q/k/v, gate/up) share one ``xtx``; it is released only when all of
    them are done, linears this pass leaves alone keep theirs. Stats objects are shared and immutable:
    holders get new objects without ``xtx`` (``ctx.state`` and the nodes' ``act_stats`` alike).
    """

    def __init__(self, ctx: PassContext, by_name: dict[str, fx.Node]) -> None:
        self.ctx = ctx
        self.by_name = by_name
        self.quantized: set[str] = set()
        self.holders: dict[int, list[str]] = {}
        for name, st in (ctx.state.get(keys.STATE_CALIBRATION) or {}).items():
            if is_dataclass(st) and getattr(st, "xtx", None) is not None:  # LinearInputStats
                self.holders.setdefault(id(st.xtx), []).append(name)

    def done(self, node: str) -> None:
        calibration = self.ctx.state.get(keys.STATE_CALIBRATION)
        if not self.holders or calibration is None or node not in calibration:
            return
        self.quantized.add(node)
        names = self.holders.get(id(calibration[node].xtx), [])
        if not names or not all(n in self.quantized for n in names):
            return
        del self.holders[id(calibration[node].xtx)]
        for name in names:
            old = calibration[name]
            calibration[name] = replace(old, xtx=None)
            linear = self.by_name.get(name)
            if linear is not None and keys.get(linear).get(keys.ACT_STATS) is old:
                keys.set_(linear, keys.ACT_STATS, calibration[name])
