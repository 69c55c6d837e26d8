"""``quantize_kv``: an int8 KV cache — static per-channel quantization of the keys and values each
attention layer stores.

What it computes: for every attention block found by the analysis, the new keys (after RoPE) and
values ``[B, KV, S, D]`` are replaced by ``dequantize(quantize(x, s, 0, -128, 127))`` before they
enter the cache (or, in a graph without a cache, attention), with one static scale per channel —
per kv head ``h`` and head dim ``d`` — from calibration: ``s = max|x[h, d]| / 127.5`` (the project's
symmetric rule, :mod:`qcompile.quant.rtn`; a channel calibration never saw nonzero gets scale 1).
Values past the calibrated range clip to [-128, 127]. Every key and value attention reads is then on
that grid, past and present alike: what a runtime storing an int8 cache computes.

Why static per channel: it is the int8 cache ONNX Runtime's ``GroupQueryAttention`` runs on the CPU
(``k_quant_type = v_quant_type = PER_CHANNEL``, ``kv_cache_bit_width = 8``; the ONNX backend lowers
these pairs to it, :mod:`qcompile.backends.onnx.attention`), which reads a quarter of an fp32 cache's
bytes per decode step. Per-channel key scales follow KIVI's observation that key outliers sit in
fixed channels; after RoPE a channel pair shares a rotation, so its range is the larger of the two.

The ranges are observed by this pass itself, on the calibration batches (``ctx.calibration``) run
through the graph as it is when the pass runs — after smoothing, rotation and weight quantization.
Statistics from an earlier ``calibrate`` would be stale: SmoothQuant's v → o smoothing divides the
value channels, QuaRot's R2 rotates them. The report gives, per layer, the SQNR of keys and values
on the calibration sample rows (quantized vs float) and the fraction of sampled values at the clip
limit.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch.fx as fx

from qcompile import ops
from qcompile.analysis.structure import AttentionSite, Structure
from qcompile.ir import QGraph, keys
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass
from qcompile.quant.calibration import CalibrationError, LinearInputStats, calibrate
from qcompile.quant.rtn import dequantize_ref, quantize_ref, sqnr_db, symmetric_qparams
from qcompile.quant.scheme import qrange

NO_CALIBRATION = (
    "the cache's ranges are observed on calibration batches: pass calibration=... to qcompile.quantize"
)
KV_SCHEME = "kv8c"  # 8-bit, per channel (kv head × head dim), symmetric, static


@dataclass
class CacheQuantReport:
    """One layer's quantized key and value entries and the error they now carry."""

    layer: int | None
    attention: str  # the sdpa node
    key: str  # the node quantized (keys after RoPE)
    value: str
    key_sqnr_db: float | None
    value_sqnr_db: float | None
    key_clipped: float | None  # fraction of sampled values at the grid's limit
    value_clipped: float | None


@register_pass
class QuantizeKVPass(Pass):
    """Static per-channel int8 fake quantization of every attention's new keys and values."""

    name: ClassVar[str] = "quantize_kv"
    kind = "quantize"
    uses_calibration = True
    requires = (facts.STRUCTURE,)

    @dataclass
    class Options:
        """The KV-cache scheme (only the one ORT's CPU attention runs: 8-bit, static, per channel)."""

        bits: int = 8
        sample_rows: int = 256  # rows kept per cache entry (seeded reservoir) for the error report

        def __post_init__(self) -> None:
            if self.bits != 8:
                raise ValueError(
                    f"quantize_kv: bits = {self.bits} is not supported; only an 8-bit cache (what ONNX "
                    "Runtime's GroupQueryAttention stores per channel) is"
                )

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        st: Structure | None = qgraph.info.get(keys.INFO_STRUCTURE)
        if st is None:
            raise PassError(self.name, "no structure on the graph; run the analyze pass first")
        if not st.attentions:
            raise PassError(
                self.name, "the analysis found no attention block: there is no KV cache to quantize"
            )
        if not ctx.calibration:
            raise PassError(self.name, f"no calibration data; {NO_CALIBRATION}")
        by_name = {n.name: n for n in qgraph.graph.nodes}
        # Check every site before changing anything: a refusal leaves the graph as it was.
        entries = [self._entries(site, by_name) for site in st.attentions]
        try:
            calibrate(
                qgraph,
                ctx.calibration,
                sample_rows=self.options.sample_rows,
                seed=ctx.seed,
                progress=ctx.show_progress,
                linears=[],
                cache_entries=[n.name for pair in entries for n in pair],
            )
        except CalibrationError as exc:
            raise PassError(self.name, str(exc).removeprefix("calibrate: ")) from exc
        plans = [
            (site, *((node, keys.get(node)[keys.KV_STATS]) for node in pair))
            for site, pair in zip(st.attentions, entries, strict=True)
        ]
        qmin, qmax = qrange(self.options.bits)
        rows = []
        for site, (key, key_stats), (value, value_stats) in plans:
            k_sqnr, k_clip = self._fake_quantize(qgraph, key, key_stats, qmin, qmax)
            v_sqnr, v_clip = self._fake_quantize(qgraph, value, value_stats, qmin, qmax)
            rows.append(
                CacheQuantReport(
                    site.layer, site.attention_node, key.name, value.name, k_sqnr, v_sqnr, k_clip, v_clip
                )
            )
        qgraph.recompile()
        report = _report(rows)
        return PassResult(qgraph, changed=True, report=report, summary=_summary(report))

    def _entries(self, site: AttentionSite, by_name: dict[str, fx.Node]) -> tuple[fx.Node, fx.Node]:
        """The site's key and value cache entries, or a refusal naming the attention and the reason."""
        entries = []
        for what, name in (("key", site.key_source), ("value", site.value_source)):
            node = by_name.get(name) if name is not None else None
            if node is None:
                raise PassError(
                    self.name,
                    f"the {what}s entering this attention's cache were not found by the analysis "
                    "(expected [batch, kv_heads, seq, head_dim] before repeat_kv / the cache concat)",
                    site.attention_node,
                )
            if any(u.target is ops.QUANTIZE for u in node.users):
                raise PassError(
                    self.name, f"the {what}s are already quantized (quantize_kv ran twice?)", node.name
                )
            entries.append(node)
        return entries[0], entries[1]

    def _fake_quantize(
        self, qgraph: QGraph, node: fx.Node, stats: LinearInputStats, qmin: int, qmax: int
    ) -> tuple[float | None, float | None]:
        """Route every reader of ``node`` through ``dequantize(quantize(node))`` with per-channel scales;
        returns (SQNR dB, clipped fraction) on the calibration sample rows."""
        val = node.meta["val"]
        kv, d = int(val.shape[1]), int(val.shape[3])
        scale, zero = symmetric_qparams(stats.channel_absmax, qmin, qmax, val.dtype)  # absmax / 127.5
        scale = scale.to(val.dtype)
        readers = list(node.users)
        anchor = next(iter(qgraph.graph.nodes))  # constants go first, as the quantize pass puts them
        s_node = qgraph.add_constant(f"{node.name}_kv_scale", scale.view(1, kv, 1, d), before=anchor)
        z_node = qgraph.add_constant(f"{node.name}_kv_zero_point", zero.view(1, kv, 1, d), before=anchor)
        order = {n: i for i, n in enumerate(qgraph.graph.nodes)}
        first = min(readers, key=order.__getitem__)
        try:
            q = qgraph.insert_call(ops.QUANTIZE, (node, s_node, z_node, qmin, qmax, 0), first, like=node)
            dq = qgraph.insert_call(ops.DEQUANTIZE, (q, s_node, z_node, 0), first, like=node)
        except ValueError as err:
            raise PassError(self.name, str(err), node.name) from err
        for user in readers:
            user.replace_input_with(node, dq)
        keys.set_(dq, keys.QUANT, KV_SCHEME)
        samples = stats.samples
        if not samples.numel():
            return None, None
        s = scale.to(samples.dtype).flatten()
        q_samples = quantize_ref(samples, s, zero.flatten(), qmin, qmax, 0)
        clipped = float(((q_samples == qmin) | (q_samples == qmax)).float().mean())
        return sqnr_db(samples, dequantize_ref(q_samples, s, zero.flatten(), 0)), clipped


def _median(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return statistics.median(finite) if finite else None


def _report(rows: list[CacheQuantReport]) -> dict[str, Any]:
    return {
        "scheme": KV_SCHEME,
        "layers": len(rows),
        "key_sqnr_db_median": _median([r.key_sqnr_db for r in rows]),
        "value_sqnr_db_median": _median([r.value_sqnr_db for r in rows]),
        "entries": [asdict(r) for r in rows],
    }


def _summary(report: dict[str, Any], worst: int = 3) -> str:
    def db(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"{report['scheme']}: int8 per-channel static KV cache in {report['layers']} attention blocks; "
        f"SQNR median keys {db(report['key_sqnr_db_median'])} dB, values {db(report['value_sqnr_db_median'])} dB "
        "(calibration samples)"
    ]
    rows = [r for r in report["entries"] if r["key_sqnr_db"] is not None]
    for r in sorted(rows, key=lambda r: min(r["key_sqnr_db"], r["value_sqnr_db"]))[:worst]:
        lines.append(
            f"  layer {r['layer']}: keys {db(r['key_sqnr_db'])} dB ({100 * r['key_clipped']:.2f} % at the limit), "
            f"values {db(r['value_sqnr_db'])} dB ({100 * r['value_clipped']:.2f} % at the limit)"
        )
    return "\n".join(lines)
