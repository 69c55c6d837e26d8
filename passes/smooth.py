"""``smooth``: SmoothQuant (fixed α), SmoothQuant+ (α searched per group) and QQQ's adaptive
smoothing (a clipping threshold searched per group) through the equivalence engine. Groups come
from the structural analysis; folding is the engine's; the calibration statistics of every smoothed
input are rescaled in step (exactly: x → x/s), so later passes (the static activation quantizer,
outlier reports) see the smoothed model.

The search scores each group under the quantizers its sink linears will get: the specs the
``annotate`` pass wrote on them (``node.meta["qcompile"]["qspec"]``; RTN weights without clip search
stand in for the weight method), so ``search = true`` requires the annotations. A sink left float adds
no error; the pass options ``weight_bits`` / ``group_size`` / ``act_bits`` / ``act_mode`` override
the annotated values for the search only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch

from qcompile.analysis.structure import Structure
from qcompile.equivalence import EquivalenceError, apply_diagonal
from qcompile.ir import QGraph, keys
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass
from qcompile.quant.scheme import ActQuantSpec, WeightQuantSpec
from qcompile.quant.smoothing import (
    GROUP_KINDS,
    GroupChoice,
    SearchObjective,
    SinkQuantizers,
    SmoothingGroup,
    activation_absmax,
    find_groups,
    search_alpha,
    search_threshold,
    smoothing_scales,
    weight_absmax,
)
from qcompile.quant.spec import LinearQuantSpec

DEFAULT_GRID = [round(0.05 * i, 2) for i in range(21)]  # 0, 0.05, …, 1 (docs/methods.md, SmoothQuant+)
# QQQ thresholds as fractions of the group's largest channel range: linear steps near 1, then
# geometric ones, because LLM outlier channels sit 100-2000x above the median channel.
DEFAULT_THRESHOLD_GRID = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001]


@register_pass
class SmoothPass(Pass):
    """Migrate activation outliers into weights: producer channel j ÷ s_j, consumer columns × s_j."""

    name: ClassVar[str] = "smooth"
    kind = "equivalence"
    requires = (facts.STRUCTURE, facts.CALIBRATION)
    # fp32 model, merges in float64: outputs move by rounding only.
    tolerance = 1e-4

    @dataclass
    class Options:
        # "smoothquant": s_j = max|X_j|^α / max|W_j|^(1-α) (α fixed, or searched with `search`);
        # "qqq": s_j = max(max|X_j| / t, 1) with t = ratio · max_j max|X_j| searched (needs `search`).
        rule: Literal["smoothquant", "qqq"] = "smoothquant"
        alpha: float = 0.5  # SmoothQuant's migration strength (eq. 4)
        search: bool = False  # SmoothQuant+ / QQQ: choose per group on the quantized output error
        alpha_grid: list[float] = field(default_factory=lambda: list(DEFAULT_GRID))
        threshold_grid: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLD_GRID))
        groups: list[str] = field(default_factory=lambda: list(GROUP_KINDS))  # qkv gate_up norm down vo
        # Quantizers the search optimises for; None = those annotated on each sink linear.
        weight_bits: int | None = None
        group_size: int | None = None
        act_bits: int | None = None
        act_mode: str | None = None
        # SmoothRot: score α after the online Hadamard the rotate pass puts on the sink input (R4).
        objective_rotation: Literal["none", "hadamard"] = "none"
        tolerance: float | None = None

    def required_facts(self) -> tuple:
        # the search scores each group under the quantizers annotated on its sinks
        return self.requires + ((facts.SPECS_ANNOTATED,) if self.options.search else ())

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        opts = self.options
        unknown = sorted(set(opts.groups) - set(GROUP_KINDS))
        if unknown:
            raise PassError(self.name, f"unknown group kind(s) {unknown}; valid: {', '.join(GROUP_KINDS)}")
        if opts.rule not in ("smoothquant", "qqq"):
            raise PassError(self.name, f"unknown rule {opts.rule!r}; valid: smoothquant, qqq")
        if opts.rule == "qqq" and not opts.search:
            raise PassError(self.name, "rule = 'qqq' searches its threshold; set search = true with it")
        if opts.rule == "qqq" and not all(0 < r < 1 for r in opts.threshold_grid):
            raise PassError(self.name, f"threshold_grid ratios must lie in (0, 1), got {opts.threshold_grid}")
        if opts.objective_rotation != "none" and not opts.search:
            raise PassError(self.name, "objective_rotation scores the α search; set search = true with it")
        st: Structure = qgraph.info[keys.INFO_STRUCTURE]
        stats = ctx.state.get(keys.STATE_CALIBRATION)
        if not stats:
            raise PassError(
                self.name, "no calibration statistics in the context; run the calibrate pass first"
            )
        stats = dict(stats)
        objective = self._objective(qgraph, st) if opts.search else None
        groups, skipped = find_groups(st, opts.groups)
        choices: list[GroupChoice] = []
        refused: list[dict[str, str]] = []
        transformed: list[str] = []  # nodes whose values change on purpose (scaled, undone at the sinks)
        for group in groups:
            try:
                choice, nodes = self._smooth_group(qgraph, st, group, stats, objective)
            except EquivalenceError as err:
                refused.append({"group": group.region.name, "kind": group.kind, "reason": str(err)})
                continue
            choices.append(choice)
            transformed += nodes
        ctx.state[keys.STATE_CALIBRATION] = stats
        for node in qgraph.graph.nodes:
            if node.name in stats:
                keys.set_(node, keys.ACT_STATS, stats[node.name])
        report = _report(choices, skipped, refused, objective, opts.rule)
        report[keys.REPORT_TRANSFORMED_NODES] = transformed
        return PassResult(
            qgraph, changed=any(c.alpha is not None for c in choices), report=report, summary=_summary(report)
        )

    def _objective(self, qgraph: QGraph, st: Structure) -> SearchObjective:
        """Each annotated linear's quantizers (RTN weights, its activation scheme), with this pass's
        options overriding the annotated values."""
        o = self.options
        sinks = {}
        for node in qgraph.graph.nodes:
            spec = node.meta.get(keys.NAMESPACE, {}).get(keys.QSPEC)
            if node.name not in st.linears or not isinstance(spec, LinearQuantSpec):
                continue
            w, a = spec.weight, spec.act
            sinks[node.name] = SinkQuantizers(
                WeightQuantSpec(
                    o.weight_bits or w.bits,
                    w.symmetric,
                    w.group_size if o.group_size is None else o.group_size,
                ),
                ActQuantSpec(o.act_bits or a.bits, o.act_mode or a.mode, a.symmetric),
            )
        return SearchObjective(sinks, o.objective_rotation)

    def _smooth_group(
        self,
        qgraph: QGraph,
        st: Structure,
        group: SmoothingGroup,
        stats: dict,
        objective: SearchObjective | None,
    ) -> tuple[GroupChoice, list[str]]:
        missing = [s for s in group.sinks if s not in stats]
        if missing:
            raise PassError(self.name, f"no calibration statistics for {missing}", node=missing[0])
        errors: dict[str, float] = {}
        if objective is None:
            alpha: float | None = self.options.alpha
            s = smoothing_scales(activation_absmax(stats, group), weight_absmax(qgraph, st, group), alpha)
        elif self.options.rule == "qqq":
            alpha, s, errors = search_threshold(
                qgraph, st, group, stats, objective, self.options.threshold_grid
            )
        else:
            alpha, s, errors = search_alpha(qgraph, st, group, stats, objective, self.options.alpha_grid)
        choice = GroupChoice(
            group.region.name,
            group.kind,
            group.layer,
            alpha,
            float(s.min()),
            float(s.max()),
            errors.get("none"),
            errors.get(f"{alpha:g}") if alpha is not None else errors.get("none"),
            errors,
        )
        if alpha is None:
            return choice, []
        absorbed = apply_diagonal(qgraph, group.region, s, self.name)
        for sink in group.sinks:
            stats[sink] = stats[sink].scale_channels(s.to(torch.float32))
        return choice, absorbed.sources + absorbed.path


def _mode(objective: SearchObjective | None, rule: str = "smoothquant") -> str:
    if objective is None:
        return "fixed alpha (SmoothQuant)"
    if rule == "qqq":
        return "threshold search (QQQ adaptive smoothing)"
    return (
        "search after the R4 Hadamard (SmoothRot)"
        if objective.rotation != "none"
        else "search (SmoothQuant+)"
    )


def _report(
    choices: list[GroupChoice],
    skipped: list,
    refused: list[dict[str, str]],
    objective: SearchObjective | None,
    rule: str = "smoothquant",
) -> dict[str, Any]:
    smoothed = [c for c in choices if c.alpha is not None]
    return {
        "mode": _mode(objective, rule),
        # what a group's "alpha" holds: SmoothQuant's α, or QQQ's threshold as a fraction of max|X|
        "parameter": "t / max|X|" if rule == "qqq" else "alpha",
        "objective": _objective_report(objective) if objective else None,
        "groups_smoothed": len(smoothed),
        "groups_left_alone": len(choices) - len(smoothed),
        "skipped": [asdict(s) for s in skipped],
        "refused": refused,
        "groups": [
            {k: v for k, v in asdict(c).items() if k != "errors"}
            | {"errors": c.errors if objective else None}
            for c in choices
        ],
    }


def _objective_report(objective: SearchObjective) -> dict[str, Any]:
    """The quantizers the search scored under: one weight / activation pair when every sink shares it,
    else the count of sinks per scheme."""
    schemes = Counter(q.short() for q in objective.sinks.values())
    if len(schemes) == 1:
        q = next(iter(objective.sinks.values()))
        out: dict[str, Any] = {"weight": q.weight.short(), "activation": q.act.short()}
    else:
        out = {"schemes": dict(schemes)}
    return out | ({"rotation": objective.rotation} if objective.rotation != "none" else {})


def _summary(report: dict[str, Any]) -> str:
    lines = [
        f"{report['mode']}: {report['groups_smoothed']} groups smoothed, {report['groups_left_alone']} left alone, "
        f"{len(report['skipped'])} skipped, {len(report['refused'])} refused by the engine"
    ]
    label = "t/max" if report.get("parameter") == "t / max|X|" else "α"
    for g in report["groups"][:8]:
        alpha = "none" if g["alpha"] is None else f"{g['alpha']:.3g}"
        gain = ""
        if g["error_before"] and g["error_after"] is not None:
            gain = f"  err {g['error_before']:.3g} → {g['error_after']:.3g}"
        lines.append(
            f"  {g['kind']:<7} layer {g['layer']!s:<4} {label}={alpha:<5} s∈[{g['s_min']:.3g}, {g['s_max']:.3g}]{gain}"
        )
    if len(report["groups"]) > 8:
        lines.append(f"  … {len(report['groups']) - 8} more groups")
    for r in report["refused"][:3]:
        lines.append(f"  refused: {r['reason']}")
    return "\n".join(lines)
