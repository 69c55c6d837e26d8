"""``rotate``: QuaRot / SpinQuant-style orthogonal rotations through the equivalence engine.

Offline (merged into weights, float64, no runtime cost):

- **R1** (residual stream, hidden × hidden): embedding ``E ← E Q``, writers (o, down) ``W ← Qᵀ W``,
  readers (q, k, v, gate, up, lm_head) ``W ← W Q``. Needs weightless norms (run ``fuse_norms`` first):
  ‖xQ‖ = ‖x‖, so a weightless RMSNorm commutes with Q (QuaRot §4.1).
- **R2** (per head, head_dim): v rows ``← Hᵀ`` per KV head, o columns ``← H`` per query head (GQA-aware:
  the map is the same for every head of a KV group).

Online (an explicit ``qcompile::hadamard`` op; its inverse merged into the linear after it):

- **R4**: Hadamard on the down_proj input, ``x → x H``, ``W_down ← W_down H`` (exact where a Hadamard of
  the intermediate width exists, else block-diagonal — reported).
- **cross-head** (QuaRot only, off by default): ``H_heads ⊗ I_d`` before o_proj; needs a Hadamard of
  order num_heads (SmolLM2's 9 heads have none: skipped, with the reason).
- **R3** (off by default): the same Hadamard on q and k after RoPE; cancels in ``q kᵀ``.

Every site gets one line in the report: the map it got (Hadamard, random Hadamard, random orthogonal
fallback, block-diagonal Hadamard) or *skipped* with the reason. The float outputs do not change
(tolerance 1e-4, checked by the equivalence instrument); calibration statistics of every linear whose
input was rotated are dropped (they describe the unrotated input): calibrate again after this pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from qcompile.analysis.structure import AttentionSite, MLPSite, Structure
from qcompile.equivalence import (
    EquivalenceError,
    RegionError,
    apply_orthogonal,
    region_for_v_o,
    residual_region,
)
from qcompile.equivalence.commute import norm_is_weightless
from qcompile.equivalence.online import OnlineReport, insert_cancelling_pair, insert_online_transform
from qcompile.ir import QGraph, keys
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass
from qcompile.quant.rotation import (
    SKIPPED,
    RotationSite,
    cross_head_hadamard,
    offline_map,
    online_hadamard,
    site_seed,
)


@register_pass
class RotatePass(Pass):
    """R1 / R2 offline, R4 (and optionally R3, cross-head) online — see the module docstring."""

    name: ClassVar[str] = "rotate"
    kind = "equivalence"
    requires = (facts.STRUCTURE,)
    # the rotated inputs' statistics are dropped (they describe the unrotated input): calibrate again
    invalidates = (facts.CALIBRATION,)
    # fp32 weights after float64 merges; R1 touches every weight once (SmolLM2 logits: 2.9e-6 measured).
    tolerance = 1e-4

    @dataclass
    class Options:
        r1: bool = True  # residual stream Q (offline)
        r2: bool = True  # per-head H on v→o (offline)
        r4: bool = True  # online Hadamard on the down_proj input
        r3: bool = False  # online Hadamard on q and k after RoPE (for KV-cache quantization)
        online_cross_head: bool = False  # QuaRot's online H_heads ⊗ I before o_proj
        randomized: bool = True  # random Hadamard (H · random ±1 diagonal) for offline sites
        seed: int = 0
        tolerance: float | None = None

    def required_facts(self) -> tuple:
        # R1 passes the norms of the residual stream: only weightless RMSNorms commute with Q
        return self.requires + ((facts.WEIGHTLESS_NORMS,) if self.options.r1 else ())

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        st: Structure | None = qgraph.info.get(keys.INFO_STRUCTURE)
        if st is None:
            raise PassError(self.name, "no structure on the graph; run the analyze pass first")
        o = self.options
        sites: list[RotationSite] = []
        transformed: list[str] = []
        rotated_inputs: set[str] = set()
        if o.r1:
            sites.append(self._r1(qgraph, st, transformed, rotated_inputs))
        if o.r2:  # offline per-head maps first: the v→o walk must not meet online ops
            sites += [self._r2(qgraph, att, st, transformed, rotated_inputs) for att in st.attentions]
        self._ops: dict[tuple, tuple] = {}  # one op (and matrix) per width, shared by the sites
        if o.r4:
            sites += [self._r4(qgraph, mlp, transformed, rotated_inputs) for mlp in st.mlps]
        if o.online_cross_head:
            sites += [self._cross_head(qgraph, att, transformed, rotated_inputs) for att in st.attentions]
        if o.r3:
            sites += [self._r3(qgraph, att, transformed) for att in st.attentions]
        qgraph.recompile()
        dropped = _drop_stale_stats(qgraph, ctx, rotated_inputs)
        report = _report(sites, dropped)
        report[keys.REPORT_TRANSFORMED_NODES] = transformed
        changed = any(s.rotation != SKIPPED for s in sites)
        return PassResult(qgraph, changed=changed, report=report, summary=_summary(report))

    # ---- offline ------------------------------------------------------------------------------------

    def _r1(self, qgraph: QGraph, st: Structure, transformed: list[str], rotated: set[str]) -> RotationSite:
        hidden = st.embeddings[0].dim if st.embeddings else 0
        if st.residual is not None and st.residual.post_norm:
            return RotationSite(
                "R1",
                "residual stream",
                None,
                hidden,
                SKIPPED,
                "post-LN: the stream passes through LayerNorms (γ, β, mean) that no rotation commutes with",
            )
        try:
            region = residual_region(st)
        except RegionError as err:
            return RotationSite("R1", "residual stream", None, hidden, SKIPPED, str(err))
        self._require_weightless(qgraph, st)
        q, kind, description = offline_map(
            region.channels, site_seed(self.options.seed, "R1"), self.options.randomized
        )
        try:
            absorbed = apply_orthogonal(qgraph, region, q, self.name)
        except EquivalenceError as err:
            return RotationSite("R1", "residual stream", None, region.channels, SKIPPED, str(err))
        transformed += absorbed.sources + absorbed.path
        rotated.update(region.sinks)
        return RotationSite(
            "R1",
            f"residual stream ({len(region.sources)} sources → {len(region.sinks)} readers)",
            None,
            region.channels,
            kind,
            description,
            [],
            len(absorbed.changes),
            absorbed.untied,
        )

    def _require_weightless(self, qgraph: QGraph, st: Structure) -> None:
        """Refuse before touching anything when a norm on the stream still scales its channels."""
        assert st.residual is not None
        for reader in st.residual.readers:
            norm = st.norms[reader]
            if norm.kind != "rms_norm" or not norm_is_weightless(qgraph, norm):
                what = f"γ `{norm.weight}`" if norm.weight else "a mean subtraction"
                raise PassError(
                    self.name,
                    f"{norm.kind} `{norm.output}` (layer {norm.layer}) on the residual stream still has {what}, "
                    "which does not commute with an orthogonal map (R1); run fuse_norms before rotate "
                    "(it folds γ/β into the readers and leaves weightless RMSNorms)",
                    node=norm.output,
                )

    def _r2(
        self, qgraph: QGraph, att: AttentionSite, st: Structure, transformed: list[str], rotated: set[str]
    ) -> RotationSite:
        where = f"layer {att.layer} v→o `{att.v}` → `{att.o}`"
        seed = site_seed(self.options.seed, "R2", att.layer)
        h, kind, description = offline_map(att.head_dim, seed, self.options.randomized)
        try:
            absorbed = apply_orthogonal(qgraph, region_for_v_o(st, att), h, self.name)
        except EquivalenceError as err:
            return RotationSite("R2", where, att.layer, att.head_dim, SKIPPED, str(err))
        transformed += absorbed.sources + absorbed.path
        rotated.add(att.o)
        heads = f"{att.num_heads} heads / {att.num_kv_heads} KV heads"
        return RotationSite(
            "R2",
            where,
            att.layer,
            att.head_dim,
            kind,
            f"{description}, per head ({heads})",
            [],
            len(absorbed.changes),
            absorbed.untied,
        )

    # ---- online -------------------------------------------------------------------------------------

    def _online(
        self,
        qgraph: QGraph,
        stage: str,
        where: str,
        layer: int | None,
        linear: str,
        made,
        transformed: list[str],
        rotated: set[str],
    ) -> RotationSite:
        op, kind, description = made
        size = op.size if op is not None else 0
        if op is None:
            return RotationSite(stage, where, layer, size, SKIPPED, description)
        try:
            done: OnlineReport = insert_online_transform(qgraph, linear, op, self.name, recompile=False)
        except EquivalenceError as err:
            return RotationSite(stage, where, layer, size, SKIPPED, str(err))
        transformed += done.op_nodes
        rotated.add(linear)
        untied = [f"{c.original} -> {c.target} ({c.reader})" for c in done.changes if c.untied]
        return RotationSite(
            stage, where, layer, size, kind, description, done.op_nodes, len(done.changes), untied
        )

    def _op(self, key: tuple, make):
        if key not in self._ops:
            self._ops[key] = make()
        return self._ops[key]

    def _r4(self, qgraph: QGraph, mlp: MLPSite, transformed: list[str], rotated: set[str]) -> RotationSite:
        width = int(qgraph.get_constant(qgraph.node(mlp.down).args[1]).shape[1])
        where = f"layer {mlp.layer} down_proj input `{mlp.down}`"
        made = self._op(("R4", width), lambda: online_hadamard(width))
        site = self._online(qgraph, "R4", where, mlp.layer, mlp.down, made, transformed, rotated)
        site.size = width
        return site

    def _cross_head(
        self, qgraph: QGraph, att: AttentionSite, transformed: list[str], rotated: set[str]
    ) -> RotationSite:
        where = f"layer {att.layer} o_proj input `{att.o}` (across {att.num_heads} heads)"
        made = self._op(
            ("cross-head", att.num_heads, att.head_dim),
            lambda: cross_head_hadamard(att.num_heads, att.head_dim),
        )
        site = self._online(qgraph, "cross-head", where, att.layer, att.o, made, transformed, rotated)
        site.size = att.num_heads
        return site

    def _r3(self, qgraph: QGraph, att: AttentionSite, transformed: list[str]) -> RotationSite:
        where = f"layer {att.layer} q, k after RoPE → `{att.attention_node}`"
        op, kind, description = self._op(("R3", att.head_dim), lambda: online_hadamard(att.head_dim))
        if op is None:
            return RotationSite("R3", where, att.layer, att.head_dim, SKIPPED, description)
        try:
            done = insert_cancelling_pair(qgraph, att.attention_node, (0, 1), op, self.name, recompile=False)
        except EquivalenceError as err:
            return RotationSite("R3", where, att.layer, att.head_dim, SKIPPED, str(err))
        transformed += done.op_nodes
        return RotationSite("R3", where, att.layer, att.head_dim, kind, description, done.op_nodes)


# ---- calibration statistics and the report ---------------------------------------------------------


def _drop_stale_stats(qgraph: QGraph, ctx: PassContext, rotated: set[str]) -> list[str]:
    """Statistics of a rotated input describe the old input (per-channel maxima do not rotate): drop them."""
    stats = ctx.state.get(keys.STATE_CALIBRATION)
    if not stats:
        return []
    dropped = sorted(n for n in rotated if n in stats)
    for name in dropped:
        del stats[name]
    for node in qgraph.graph.nodes:
        if node.name in dropped:
            keys.clear(node, keys.ACT_STATS)
    return dropped


def _report(sites: list[RotationSite], dropped: list[str]) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for s in sites:
        counts.setdefault(s.stage, Counter())[s.rotation] += 1  # type: ignore[index]
    return {
        "sites": [asdict(s) for s in sites],
        "counts": {stage: dict(c) for stage, c in counts.items()},
        "skipped": [
            {"stage": s.stage, "site": s.site, "reason": s.description}
            for s in sites
            if s.rotation == SKIPPED
        ],
        "calibration_dropped": dropped,
    }


def _summary(report: dict[str, Any]) -> str:
    lines = []
    by_stage: dict[str, list[dict]] = {}
    for s in report["sites"]:
        by_stage.setdefault(s["stage"], []).append(s)
    for stage, sites in by_stage.items():
        kinds = ", ".join(f"{k} ×{n}" for k, n in report["counts"][stage].items())
        first = next((s for s in sites if s["rotation"] != SKIPPED), sites[0])
        lines.append(
            f"{stage:<10} {len(sites)} site(s), size {first['size']}: {kinds} — {first['description']}"
        )
    for s in report["skipped"][:3]:
        lines.append(f"  skipped {s['stage']} {s['site']}: {s['reason']}")
    if report["calibration_dropped"]:
        lines.append(
            f"  calibration statistics of {len(report['calibration_dropped'])} rotated inputs dropped: "
            "calibrate again after rotate"
        )
    return "\n".join(lines)
