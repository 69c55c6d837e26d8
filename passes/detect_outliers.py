"""``detect_outliers``: per linear input, channel outliers and massive activations (analysis).

Reads the calibration statistics (``ctx.state[keys.STATE_CALIBRATION]``, or ``act_stats`` on the linears),
writes an :class:`~qcompile.analysis.outliers.OutlierReport` to ``node.meta["qcompile"]["outliers"]``, and
reports every linear (JSON) plus a table of the ten worst by max channel ratio — the first thing to
look at when choosing where to smooth or explaining accuracy loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qcompile.analysis.outliers import OutlierReport, find_outliers
from qcompile.ir import QGraph, keys
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass
from qcompile.quant.calibration import LinearInputStats

WORST_SHOWN = 10


@register_pass
class DetectOutliersPass(Pass):
    """Channel outliers (ratio to the layer median, top-k) and massive token spikes per linear input."""

    name: ClassVar[str] = "detect_outliers"
    kind = "analysis"
    requires = (facts.CALIBRATION,)

    @dataclass
    class Options:
        channel_ratio: float = 20.0  # a channel is an outlier above this × the median channel abs-max
        top_k: int = 8  # channels listed per linear
        massive_ratio: float = 100.0  # a token is massive above this × the median token abs-max

        def __post_init__(self) -> None:
            if self.channel_ratio <= 0 or self.massive_ratio <= 0 or self.top_k < 0:
                raise ValueError("channel_ratio and massive_ratio must be > 0 and top_k >= 0")

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        opts = self.options
        stats = _calibration_stats(qgraph, ctx, self.name)
        entries: list[dict[str, Any]] = []
        for node in qgraph.graph.nodes:
            if node.name not in stats:
                continue
            rep = find_outliers(
                stats[node.name],
                channel_ratio=opts.channel_ratio,
                top_k=opts.top_k,
                massive_ratio=opts.massive_ratio,
            )
            keys.set_(node, keys.OUTLIERS, rep)
            ann = keys.get(node)
            entries.append(_entry(rep, ann.get(keys.ROLE), ann.get(keys.LAYER), ann.get(keys.MODULE, "")))
        worst = sorted(entries, key=lambda e: e["max_ratio"], reverse=True)[:WORST_SHOWN]
        report = {
            "thresholds": {
                "channel_ratio": opts.channel_ratio,
                "top_k": opts.top_k,
                "massive_ratio": opts.massive_ratio,
            },
            "linears_checked": len(entries),
            "with_channel_outliers": sum(1 for e in entries if e["outlier_channels"]),
            "with_massive": sum(1 for e in entries if e["massive"] and e["massive"]["count"]),
            "worst": [e["node"] for e in worst],
            "linears": entries,
        }
        return PassResult(qgraph, changed=False, report=report, summary=format_worst(report, worst))


def _calibration_stats(qgraph: QGraph, ctx: PassContext, pass_name: str) -> dict[str, LinearInputStats]:
    stats = ctx.state.get(keys.STATE_CALIBRATION)
    if stats is None:  # e.g. a graph calibrated in an earlier pipeline: the stats ride on node.meta
        stats = {
            n.name: keys.get(n)[keys.ACT_STATS] for n in qgraph.graph.nodes if keys.ACT_STATS in keys.get(n)
        }
    if not stats:
        raise PassError(
            pass_name,
            "no calibration statistics (ctx.state['calibration'] or node act_stats); run calibrate first",
        )
    return stats


def _entry(rep: OutlierReport, role: str | None, layer: int | None, module: str) -> dict[str, Any]:
    return {
        "node": rep.node,
        "role": role,
        "layer": layer,
        "module": module,
        "in_features": rep.in_features,
        "median_absmax": rep.median_channel_absmax,
        "max_ratio": rep.max_ratio,
        "outlier_channels": rep.outlier_channels,
        "top_channels": [
            {"channel": c.channel, "absmax": c.absmax, "ratio": c.ratio} for c in rep.top_channels
        ],
        "massive": None if rep.massive is None else rep.to_dict()["massive"],
    }


def _ratio(r: float) -> str:
    return f"{r:.0f}" if r >= 100 else f"{r:.1f}"


def _massive_cell(massive: dict[str, Any] | None) -> str:
    if massive is None:
        return "stale (rescaled)"
    if not massive["count"]:
        return f"0 (max {_ratio(massive['max_ratio'])}×)"
    return f"{massive['count']} tok, |x|={massive['max_value']:.4g} ({_ratio(massive['max_ratio'])}×)"


def format_worst(report: dict[str, Any], worst: list[dict[str, Any]]) -> str:
    """The summary: counts, then one row per worst linear (role, layer, module, ratios, channels)."""
    th = report["thresholds"]
    lines = [
        f"channel outliers (> {th['channel_ratio']:g}× median channel) in {report['with_channel_outliers']} of "
        f"{report['linears_checked']} linears; massive tokens (> {th['massive_ratio']:g}× median token) in "
        f"{report['with_massive']}",
        f"worst {len(worst)} by max channel ratio:",
    ]
    header = (
        "#",
        "node",
        "role",
        "layer",
        "module",
        "in",
        "max×",
        ">thr",
        "top channels (×median)",
        "massive (max×)",
    )
    rows = [header]
    for i, e in enumerate(worst, 1):
        top = ", ".join(f"{c['channel']}:{_ratio(c['ratio'])}" for c in e["top_channels"][:3])
        layer = "-" if e["layer"] is None else str(e["layer"])
        rows.append(
            (str(i), e["node"], str(e["role"] or "-"), layer, e["module"] or "-", str(e["in_features"]),
             _ratio(e["max_ratio"]), str(len(e["outlier_channels"])), top, _massive_cell(e["massive"]))
        )  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    for r in rows:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)
