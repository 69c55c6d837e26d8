"""``quantize``: insert quantize/dequantize around every selected linear (RTN or GPTQ weights, QDQ
activations).

For each linear found by the ``analyze`` pass (``qgraph.info[keys.INFO_STRUCTURE]``):

- **weight**: the float constant W is replaced by ``qcompile.dequantize(q, scale, zero_point, g)`` on
  new constants computed offline — the weight's quantize step is already constant-folded. The float
  constant is removed when nothing else reads it (a tied embedding keeps it). ``weight_method``:

  - ``rtn`` (default): :func:`qcompile.quant.rtn.quantize_weight`, round to nearest, with the
    optional ``clip_search``;
  - ``gptq``: :func:`qcompile.quant.gptq.gptq_quantize` (GPTQ, Frantar et al. 2022, Alg. 1) with the
    Hessian ``XᵀX`` from calibration — the ``calibrate`` pass must run with ``hessian = true``.
    With ``clip_search`` the group grids are RTN's clipped ones, fixed before GPTQ's loop (see
    :mod:`qcompile.quant.gptq`). Linears are quantized one at a time;
    once every linear reading an ``XᵀX`` is quantized, the pass drops it from the calibration
    statistics (new stats objects in ``ctx.state[keys.STATE_CALIBRATION]`` and ``act_stats``; the shared
    objects are never mutated), so the Hessians are freed as the pass goes.
- **input activation** (unless ``act_mode = "none"``): dynamic per token,
  ``choose_qparams_per_token → quantize → dequantize``; or static per tensor, ``quantize →
  dequantize`` with a scale from the calibrated abs-max (``ctx.state[keys.STATE_CALIBRATION]``, written by the
  ``calibrate`` pass). Linears that read the same tensor (q, k, v; gate, up) share one QDQ chain.

Scale rules and the ragged last group are those of :mod:`qcompile.quant.rtn`. The embedding is
excluded by construction (a gather, not a linear); ``lm_head`` is excluded by default. Every
inserted node gets ``meta["val"]`` from the ops' fake implementations, and each quantized linear
gets ``node.meta["qcompile"]["quant"]`` = its scheme string (e.g. ``w4g128s-a8ts``, see
:mod:`qcompile.quant.scheme`). The report gives per-linear weight SQNR and, when calibration samples
exist, output SQNR on them (``X Wᵀ`` vs ``X̂ Ŵᵀ``, the activation scheme applied, bias left out).
"""

from __future__ import annotations

import math
import operator
import statistics
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from qcompile import ops
from qcompile.analysis.structure import LinearSite, Structure
from qcompile.ir import QGraph, keys
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass
from qcompile.quant.gptq import GPTQError, gptq_quantize
from qcompile.quant.rtn import (
    QuantizedWeight,
    fake_quant_activation,
    quantize_weight,
    sqnr_db,
    static_per_tensor_qparams,
)
from qcompile.quant.scheme import ActQuantSpec, WeightQuantSpec, scheme_string

NO_CALIBRATION = "run the calibrate pass first or choose act_mode=dynamic_per_token"
NO_HESSIAN = "set hessian = true on the calibrate pass (before quantize) or choose weight_method=rtn"


@dataclass
class LinearQuantReport:
    """What happened to one linear: its scheme and the error it now makes."""

    node: str
    role: str
    layer: int | None
    scheme: str
    weight_sqnr_db: float  # W vs Ŵ
    output_sqnr_db: float | None = None  # X Wᵀ vs X̂ Ŵᵀ on calibration samples, when there are any
    mean_clip_ratio: float | None = None  # clip search only
    method: str = "rtn"  # weight quantizer: rtn | gptq


@register_pass
class QuantizePass(Pass):
    """RTN or GPTQ weights + QDQ activations on every selected linear (see the module docstring)."""

    name: ClassVar[str] = "quantize"
    kind = "quantize"
    requires = (facts.STRUCTURE,)

    @dataclass
    class Options:
        """Quantization scheme of the linears (defaults: W8A8, per-channel weights, per-token acts)."""

        weight_bits: int = 8
        weight_symmetric: bool = True
        group_size: int = 0  # 0 = per output channel; g = groups of g input channels (ragged last)
        clip_search: bool = False  # search a range shrink per row/group (output error if calibrated)
        act_bits: int = 8
        act_mode: Literal["dynamic_per_token", "static_per_tensor", "none"] = "dynamic_per_token"
        act_symmetric: bool = True
        exclude_roles: list[str] = field(default_factory=lambda: ["lm_head"])
        include_roles: list[str] | None = None  # None = every role not excluded
        weight_method: Literal["rtn", "gptq"] = "rtn"  # gptq needs calibrate(hessian = true)
        gptq_block_size: int = 128  # columns per lazy-update block (GPTQ Alg. 1)
        gptq_damp: float = 0.01  # λ = damp · mean(diag H) added to H's diagonal
        gptq_act_order: bool = False  # columns by decreasing diag(H); groups stay contiguous (static)

        def __post_init__(self) -> None:
            self.weight_spec()  # validates bits / group size
            self.act_spec()
            if self.gptq_block_size <= 0 or self.gptq_damp < 0:
                raise ValueError("gptq_block_size must be > 0 and gptq_damp >= 0")

        def weight_spec(self) -> WeightQuantSpec:
            return WeightQuantSpec(self.weight_bits, self.weight_symmetric, self.group_size, self.clip_search)

        def act_spec(self) -> ActQuantSpec:
            return ActQuantSpec(self.act_bits, self.act_mode, self.act_symmetric)

    def required_facts(self) -> tuple:
        # GPTQ reads XᵀX and static activations their calibrated ranges
        opts = self.options
        calibrated = opts.weight_method == "gptq" or opts.act_mode == "static_per_tensor"
        return self.requires + ((facts.CALIBRATION,) if calibrated else ())

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        st: Structure | None = qgraph.info.get(keys.INFO_STRUCTURE)
        if st is None:
            raise PassError(self.name, "no structure on the graph; run the analyze pass first")
        wspec, aspec = self.options.weight_spec(), self.options.act_spec()
        gptq = self.options.weight_method == "gptq"
        calibration: dict[str, Any] | None = ctx.state.get(keys.STATE_CALIBRATION)
        by_name = {n.name: n for n in qgraph.graph.nodes}
        rewriter = _Rewriter(qgraph)
        rows: list[LinearQuantReport] = []
        excluded: list[dict[str, str]] = []
        selected: list[tuple[LinearSite, fx.Node, Any]] = []
        for site in st.linears.values():
            node = by_name[site.node]
            reason = self._exclusion(site, node)
            if reason is not None:
                excluded.append({"node": site.node, "role": site.role, "reason": reason})
                continue
            stats = calibration.get(site.node) if calibration is not None else None
            self._check_calibration(site, stats, calibration is not None, aspec)
            selected.append((site, node, stats))
        hessians = _HessianRelease(ctx, by_name) if gptq else None
        for site, node, stats in selected:
            rows.append(self._quantize_linear(qgraph, rewriter, node, site, wspec, aspec, stats))
            if hessians is not None:
                hessians.done(site.node)
        rewriter.drop_unused_weights()
        qgraph.recompile()
        qgraph.info[keys.INFO_QUANTIZE] = {r.node: r.scheme for r in rows}
        report = _report(rows, excluded, scheme_string(wspec, aspec))
        report["weight_method"] = self.options.weight_method
        return PassResult(qgraph, changed=bool(rows), report=report, summary=_summary(report, rows))

    def _check_calibration(self, site: LinearSite, stats: Any, calibrated: bool, aspec: ActQuantSpec) -> None:
        """Refuse, before the graph is touched, a linear whose calibration the scheme cannot do without."""
        why = "no calibration statistics" if not calibrated else "no calibration entry for it"
        if aspec.mode == "static_per_tensor" and stats is None:
            raise PassError(self.name, f"act_mode=static_per_tensor but {why}; {NO_CALIBRATION}", site.node)
        if self.options.weight_method == "gptq" and getattr(stats, "xtx", None) is None:
            if stats is not None:
                why = "its calibration statistics have no Hessian XᵀX"
            raise PassError(self.name, f"weight_method=gptq but {why}; {NO_HESSIAN}", site.node)

    def _exclusion(self, site: LinearSite, node: fx.Node) -> str | None:
        opts = self.options
        if site.role in opts.exclude_roles:
            return f"role {site.role} in exclude_roles"
        if opts.include_roles is not None and site.role not in opts.include_roles:
            return f"role {site.role} not in include_roles"
        w = node.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target) == site.weight):
            return "weight is no longer a float constant (already quantized?)"
        return None

    def _quantize_linear(
        self,
        qgraph: QGraph,
        rewriter: _Rewriter,
        node: fx.Node,
        site: LinearSite,
        wspec: WeightQuantSpec,
        aspec: ActQuantSpec,
        stats: Any,
    ) -> LinearQuantReport:
        w = qgraph.get_constant(site.weight)
        samples = getattr(stats, "samples", None) if stats is not None else None
        xtx = getattr(stats, "xtx", None) if stats is not None else None
        n = site.in_features
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
        qw = self._quantize_weight(w, wspec, stats, site)
        w_hat = qw.dequantize()
        rewriter.replace_weight(node, qw)
        static_range = self._static_range(site, stats, aspec) if aspec.mode == "static_per_tensor" else None
        if aspec.enabled:
            rewriter.quantize_input(node, aspec, static_range)
        scheme = scheme_string(wspec, aspec)
        keys.set_(node, keys.QUANT, scheme)
        out_sqnr = None
        if samples is not None and samples.numel():
            x = samples.to(device=w.device, dtype=w.dtype)
            out_sqnr = sqnr_db(x @ w.T, fake_quant_activation(x, aspec, static_range) @ w_hat.T)
        clip = float(qw.clip_ratio.mean()) if qw.clip_ratio is not None else None
        method = self.options.weight_method
        return LinearQuantReport(
            site.node, site.role, site.layer, scheme, sqnr_db(w, w_hat), out_sqnr, clip, method
        )

    def _quantize_weight(
        self, w: torch.Tensor, wspec: WeightQuantSpec, stats: Any, site: LinearSite
    ) -> QuantizedWeight:
        """W quantized by the chosen method: RTN (clip search on the calibration inputs) or GPTQ."""
        opts = self.options
        if opts.weight_method == "rtn":
            samples = getattr(stats, "samples", None) if stats is not None else None
            xtx = getattr(stats, "xtx", None) if stats is not None else None
            return quantize_weight(w, wspec, samples=samples, xtx=xtx)
        try:
            return gptq_quantize(
                w,
                stats.xtx,
                stats.n_tokens,
                wspec,
                block_size=opts.gptq_block_size,
                damp=opts.gptq_damp,
                act_order=opts.gptq_act_order,
            )
        except GPTQError as exc:
            raise PassError(self.name, f"GPTQ failed: {exc}", site.node) from exc

    def _static_range(self, site: LinearSite, stats: Any, aspec: ActQuantSpec) -> tuple[float, float]:
        """The calibrated range [lo, hi] of the linear's input: ±tensor_absmax (symmetric), else the
        extremes of the per-channel min/max."""
        if aspec.symmetric:
            absmax = float(stats.tensor_absmax)
            return -absmax, absmax
        lo, hi = getattr(stats, "channel_min", None), getattr(stats, "channel_max", None)
        if lo is None or hi is None:
            raise PassError(
                self.name,
                "asymmetric static activations need channel_min/channel_max from calibration",
                site.node,
            )
        return float(lo.min()), float(hi.max())


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
        calibration = self.ctx.state[keys.STATE_CALIBRATION]
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


class _Rewriter:
    """Graph surgery for the pass: new constants and op nodes, each with ``meta["val"]``."""

    def __init__(self, qgraph: QGraph) -> None:
        self.qgraph = qgraph
        self.replaced: list[fx.Node] = []  # float weight get_attr nodes that lost a user
        self.act_cache: dict[tuple, fx.Node] = {}  # (input node, static range) -> dequantized input

    def replace_weight(self, linear: fx.Node, qw: Any) -> None:
        """linear(x, W) → linear(x, dequantize(q, scale, zp, g)), the constants computed offline."""
        w_node = linear.args[1]
        hint = str(w_node.target)
        consts = [
            self.qgraph.add_constant(f"{hint}_{suffix}", t, before=w_node)
            for suffix, t in (("q", qw.q), ("scale", qw.scale), ("zero_point", qw.zero_point))
        ]
        deq = self._call(ops.DEQUANTIZE, (*consts, qw.group_size), before=linear, like=linear)
        linear.replace_input_with(w_node, deq)
        self.replaced.append(w_node)

    def quantize_input(
        self, linear: fx.Node, spec: ActQuantSpec, static_range: tuple[float, float] | None
    ) -> None:
        """Put a QDQ chain on the linear's input; linears reading the same tensor (and, when static,
        with the same calibrated range) share it."""
        x = linear.args[0]
        key = (x, static_range)
        if key not in self.act_cache:
            if spec.mode == "dynamic_per_token":
                qp = self._call(
                    ops.CHOOSE_QPARAMS_PER_TOKEN, (x, spec.qmin, spec.qmax, spec.symmetric), linear, linear
                )
                scale = self._getitem(qp, 0, linear)
                zp = self._getitem(qp, 1, linear)
            else:
                val = x.meta["val"]
                s, z = (t.to(val.device) for t in static_per_tensor_qparams(*static_range, spec, val.dtype))
                scale = self.qgraph.add_constant(
                    f"{linear.name}_act_scale", s, before=_first_placeholder(self.qgraph)
                )
                zp = self.qgraph.add_constant(
                    f"{linear.name}_act_zero_point", z, before=_first_placeholder(self.qgraph)
                )
            q = self._call(ops.QUANTIZE, (x, scale, zp, spec.qmin, spec.qmax, 0), linear, linear)
            self.act_cache[key] = self._call(ops.DEQUANTIZE, (q, scale, zp, 0), linear, linear)
        linear.replace_input_with(x, self.act_cache[key])

    def drop_unused_weights(self) -> None:
        """Erase float weight constants nothing reads any more (node and buffer)."""
        self.qgraph.drop_unused_constants([str(w.target) for w in self.replaced])

    # ---- node construction with meta["val"] ----

    def _call(self, op: Any, args: tuple, before: fx.Node, like: fx.Node) -> fx.Node:
        try:
            return self.qgraph.insert_call(op, args, before, like)
        except ValueError as err:
            raise PassError(QuantizePass.name, str(err), before.name) from err

    def _getitem(self, node: fx.Node, index: int, before: fx.Node) -> fx.Node:
        with self.qgraph.graph.inserting_before(before):
            item = self.qgraph.graph.call_function(operator.getitem, (node, index))
        item.meta["val"] = node.meta["val"][index]
        return item


def _first_placeholder(qgraph: QGraph) -> fx.Node:
    return next((n for n in qgraph.graph.nodes if n.op == "placeholder"), next(iter(qgraph.graph.nodes)))


# ---- report ---------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float] | None:
    finite = [v for v in values if v is not None]
    if not finite:
        return None
    return {"min": min(finite), "median": statistics.median(finite)}


def _report(rows: list[LinearQuantReport], excluded: list[dict[str, str]], scheme: str) -> dict[str, Any]:
    return {
        "scheme": scheme,
        "quantized": len(rows),
        "excluded": excluded,
        "weight_sqnr_db": _stats([r.weight_sqnr_db for r in rows]),
        "output_sqnr_db": _stats([r.output_sqnr_db for r in rows if r.output_sqnr_db is not None]),
        "linears": [asdict(r) for r in rows],
    }


def _fmt_db(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def _summary(report: dict[str, Any], rows: list[LinearQuantReport], worst: int = 5) -> str:
    w, o = report["weight_sqnr_db"], report["output_sqnr_db"]
    excl = ", ".join(f"{e['node']} ({e['reason']})" for e in report["excluded"]) or "none"
    method = report.get("weight_method", "rtn")
    lines = [f"{report['scheme']} ({method}): {report['quantized']} linears quantized; excluded: {excl}"]
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    if w:
        lines.append(f"  weight SQNR min {_fmt_db(w['min'])} dB, median {_fmt_db(w['median'])} dB")
    if o:
        lines.append(
            f"  output SQNR min {_fmt_db(o['min'])} dB, median {_fmt_db(o['median'])} dB (calibration samples)"
        )
    key = (lambda r: r.output_sqnr_db) if o else (lambda r: r.weight_sqnr_db)
    ranked = sorted(rows, key=key)[:worst]
    if ranked:
        lines.append(
            f"  worst {len(ranked)}:  {'node':<14} {'role':<7} {'layer':>5} {'weight dB':>10} {'output dB':>10}"
        )
        for r in ranked:
            layer = "-" if r.layer is None else str(r.layer)
            lines.append(
                f"            {r.node:<14} {r.role:<7} {layer:>5} {_fmt_db(r.weight_sqnr_db):>10} "
                f"{_fmt_db(r.output_sqnr_db):>10}"
            )
    return "\n".join(lines)
