"""``fuse_norms``: fold every norm's γ (and β) into the linears that read it, leaving weightless norms
(QuaRot §4 / SpinQuant: the step that lets an orthogonal map pass the norms, docs/methods.md "Rotation" 1).

- RMSNorm ``y = γ ⊙ x/rms(x)``: every reader ``W ← W diag(γ)``; the γ multiply is removed.
- LayerNorm ``y = γ ⊙ (x−μ)/σ + β``: also ``b ← b + W β`` (a bias is added where there was none).
  Pre-LN models then get a mean-free residual stream: embedding rows centred, each writer's output
  rows made mean-free (``W ← W − 1·mean_rows(W)``, ``b ← b − mean(b)``). LayerNorm ignores a shift
  along ``1`` (``LN(x + c·1) = LN(x)``), so this changes nothing, and on a mean-free stream a weightless
  LayerNorm *is* an RMSNorm with the same ε: it is rewritten as one so rotations can pass it.
- Post-LN models (BERT): a norm's output also feeds the next residual add, so γ/β cannot move into
  the readers without changing the skip path; each such norm is reported as not fused, with the
  engine's reason.

The checks (which nodes read a norm, through which ops) and the float64 merges are the equivalence
engine's; a constant shared with a reader outside the fold (a tied embedding read by lm_head) is
copied first ("untied"). Analysis is re-run at the end so the Structure shows weightless norms.
Calibration statistics of the readers are rescaled in step where exact (RMSNorm: ``x → x/γ``) and
dropped otherwise (reported).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile.analysis import patterns as P
from qcompile.analysis.analyzer import analyze
from qcompile.analysis.structure import NormSite, Structure
from qcompile.equivalence import EquivalenceError, check_region, diagonal_scale, region_for_norm
from qcompile.equivalence.constants import write_updates
from qcompile.equivalence.producers import ConstantUpdate, consumer_update
from qcompile.equivalence.transforms import DiagonalScale
from qcompile.ir import QGraph, keys
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass

aten = torch.ops.aten
F64 = torch.float64


@dataclass
class FusedNorm:
    norm: str
    kind: str
    layer: int | None
    readers: list[str]
    beta_to_bias: bool = False
    zero_gamma_channels: int = 0
    untied: list[str] = field(default_factory=list)


@dataclass
class NotFused:
    norm: str
    kind: str
    layer: int | None
    reason: str


@register_pass
class FuseNormsPass(Pass):
    """Fold norm γ/β into the readers; centre pre-LN LayerNorm streams (see the module docstring)."""

    name: ClassVar[str] = "fuse_norms"
    kind = "equivalence"
    requires = (facts.STRUCTURE,)
    ensures = (facts.STRUCTURE, facts.WEIGHTLESS_NORMS)
    # fp32 weights, merges in float64: outputs move by one rounding of each changed weight
    # (SmolLM2 logits: 1.8e-6 measured).
    tolerance = 1e-5

    @dataclass
    class Options:
        centre_layer_norm: bool = True  # pre-LN LayerNorm: mean-free stream, LayerNorm → RMSNorm
        tolerance: float | None = None

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        st: Structure | None = qgraph.info.get(keys.INFO_STRUCTURE)
        if st is None:
            raise PassError(self.name, "no structure on the graph; run the analyze pass first")
        stats = ctx.state.get(keys.STATE_CALIBRATION)
        fused: list[FusedNorm] = []
        not_fused: list[NotFused] = []
        for norm in list(st.norms.values()):
            if norm.weight is None and norm.bias is None:
                continue  # already weightless
            try:
                fused.append(self._fold(qgraph, st, norm, stats))
            except EquivalenceError as err:
                not_fused.append(NotFused(norm.output, norm.kind, norm.layer, _post_norm_reason(st, err)))
        centring = (
            self._centre(qgraph, st, {f.norm for f in fused}) if self.options.centre_layer_norm else None
        )
        qgraph.recompile()
        new_st = analyze(qgraph)
        for node in qgraph.graph.nodes:  # rescaled statistics replace the old; dropped ones go
            if stats is not None and node.name in stats:
                keys.set_(node, keys.ACT_STATS, stats[node.name])
            else:
                keys.clear(node, keys.ACT_STATS)
        report = {
            "fused": [asdict(f) for f in fused],
            "not_fused": [asdict(n) for n in not_fused],
            "centring": centring,
            "weightless_norms": sum(1 for n in new_st.norms.values() if n.weight is None and n.bias is None),
            "norms": len(new_st.norms),
            "tied_embedding": new_st.tied_embedding,
        }
        return PassResult(
            qgraph,
            changed=bool(fused or (centring or {}).get("centred")),
            report=report,
            summary=_summary(report),
        )

    # ---- one norm ----------------------------------------------------------------------------------

    def _fold(self, qgraph: QGraph, st: Structure, norm: NormSite, stats: dict | None) -> FusedNorm:
        """γ into the readers' columns (``W diag(γ)``), β into their biases (``b + W β``), then drop γ/β."""
        region = region_for_norm(st, norm.output)
        ones = diagonal_scale(torch.ones(norm.dim, dtype=F64))
        check = check_region(qgraph, region, ones, self.name)  # every reader is a linear; or refuse
        gamma = _const64(qgraph, norm.weight, norm.dim, 1.0)
        beta = _const64(qgraph, norm.bias, norm.dim, 0.0) if norm.bias is not None else None
        fold = DiagonalScale(gamma)  # consumer half of T = diag(1/γ): W ← W diag(γ) (zeros allowed)
        updates = [consumer_update(qgraph, s, fold, check.sink_maps[s]) for s in region.sinks]
        new_biases: dict[str, torch.Tensor] = {}
        if beta is not None:
            for sink in region.sinks:
                node = qgraph.node(sink)
                shift = qgraph.get_constant(node.args[1]).to(F64) @ beta[check.sink_maps[sink]]
                bias = P.linear_bias(node)
                if bias is None:
                    new_biases[sink] = shift
                else:
                    updates.append(
                        ConstantUpdate(str(bias.target), sink, "bias += W β", lambda b, d=shift: b + d)
                    )
        changes, _ = write_updates(qgraph, updates)
        for sink, shift in new_biases.items():
            _add_bias(qgraph, qgraph.node(sink), shift)
        _make_weightless(qgraph, norm)
        _rescale_stats(stats, region.sinks, check.sink_maps, gamma, exact=beta is None)
        return FusedNorm(
            norm.output,
            norm.kind,
            norm.layer,
            list(region.sinks),
            beta is not None,
            int((gamma == 0).sum()),
            [f"{c.original} -> {c.target} ({c.reader})" for c in changes if c.untied],
        )

    # ---- pre-LN LayerNorm: centre the stream -------------------------------------------------------

    def _centre(self, qgraph: QGraph, st: Structure, fused: set[str]) -> dict[str, Any] | None:
        layer_norms = [n for n in st.norms.values() if n.kind == "layer_norm"]
        if not layer_norms:
            return None
        stream = st.residual
        if stream is None or not stream.adds:
            return {"centred": False, "reason": "no residual stream found; LayerNorms left as they are"}
        if stream.post_norm:
            return {
                "centred": False,
                "reason": (
                    "post-LN (BERT-style): every LayerNorm sits on the stream itself (its output is the next skip), "
                    "so the stream cannot be made mean-free and LayerNorm stays LayerNorm; no rotation of the "
                    "residual stream (R1) is possible, per-head R2 and online transforms still are"
                ),
            }
        problem, embeddings = _stream_check(qgraph, st)
        if problem is not None:
            return {"centred": False, "reason": problem}
        updates = _centring_updates(qgraph, embeddings, stream.writers)
        changes, _ = write_updates(qgraph, updates)
        stream_nodes = set(stream.adds) | set(stream.sources)
        converted = [
            n.output
            for n in st.norms.values()
            if n.kind == "layer_norm" and n.input in stream_nodes and n.output in fused
        ]
        for name in converted:
            _layer_norm_to_rms(qgraph, qgraph.node(name))
        return {
            "centred": True,
            "embeddings": [e.name for e in embeddings],
            "writers": list(stream.writers),
            "layer_norm_to_rms_norm": converted,
            "untied": [f"{c.original} -> {c.target} ({c.reader})" for c in changes if c.untied],
        }


# ---- helpers ----------------------------------------------------------------------------------------


def _const64(qgraph: QGraph, target: str | None, dim: int, fill: float) -> torch.Tensor:
    if target is None:
        return torch.full((dim,), fill, dtype=F64)
    return qgraph.get_constant(target).detach().to("cpu", F64).reshape(-1)


def _post_norm_reason(st: Structure, err: EquivalenceError) -> str:
    if st.residual is not None and st.residual.post_norm:
        return (
            f"post-LN: the norm's output also feeds `{err.node}` ({err.op}), the next residual add, so γ/β "
            f"cannot move into its readers without changing the skip path (engine: {err.reason})"
        )
    return str(err)


def _add_bias(qgraph: QGraph, linear: fx.Node, bias: torch.Tensor) -> None:
    """linear(x, W) → linear(x, W, b) with a new constant b (β folded into a reader without a bias)."""
    w = qgraph.get_constant(linear.args[1])
    node = qgraph.add_constant(f"{linear.name}_bias", bias.to(w.dtype).to(w.device), before=linear)
    linear.args = (linear.args[0], linear.args[1], node)
    linear.kwargs = {k: v for k, v in linear.kwargs.items() if k != "bias"}


def _make_weightless(qgraph: QGraph, norm: NormSite) -> None:
    """Remove γ (and β) from the norm: the γ multiply of a decomposed RMSNorm goes; fused ops lose the args."""
    out = qgraph.node(norm.output)
    if P.is_op(out, P.LAYER_NORM_OPS):
        args = list(out.args) + [None] * (5 - len(out.args))
        args[2], args[3] = None, None
        out.args = tuple(args[:4]) + (args[4] if args[4] is not None else norm.eps,)
    elif P.is_op(out, P.RMS_NORM_OPS):
        args = list(out.args) + [None] * (4 - len(out.args))
        args[2] = None
        out.args = tuple(args)
    elif norm.weight is not None:  # decomposed: out = mul(γ, normalised) in either order
        gamma_nodes = [a for a in out.args if P.is_constant(a) and str(a.target) == norm.weight]
        other = next(a for a in out.args if isinstance(a, fx.Node) and a not in gamma_nodes)
        out.replace_all_uses_with(other)
        qgraph.graph.erase_node(out)
    qgraph.drop_unused_constants([t for t in (norm.weight, norm.bias) if t is not None])


def _rescale_stats(
    stats: dict | None, sinks: list[str], maps: dict, gamma: torch.Tensor, exact: bool
) -> None:
    """The readers now see ``x/γ`` (RMSNorm): exact rescale; with β, or a zero γ, the stats are dropped."""
    if stats is None:
        return
    for sink in sinks:
        if sink not in stats:
            continue
        s = gamma[maps[sink]]
        if exact and bool((s != 0).all()):
            stats[sink] = stats[sink].scale_channels(s.float())
        else:
            del stats[sink]


def _centring_updates(qgraph: QGraph, embeddings: list[fx.Node], writers: list[str]) -> list[ConstantUpdate]:
    """Mean-free stream (QuaRot, LayerNorm models): every embedding row centred, every writer's output
    rows made mean-free (``W ← W − 1·mean_rows(W)``, ``b ← b − mean(b)``)."""

    def centre_rows(t: torch.Tensor) -> torch.Tensor:
        return t - t.mean(-1, keepdim=True)

    def centre_outputs(w: torch.Tensor) -> torch.Tensor:
        return w - w.mean(0, keepdim=True)

    updates = [
        ConstantUpdate(str(e.args[0].target), e.name, "centred embedding rows", centre_rows)
        for e in embeddings
    ]
    for writer in writers:
        node = qgraph.node(writer)
        updates.append(
            ConstantUpdate(str(node.args[1].target), writer, "mean-free output rows", centre_outputs)
        )
        bias = P.linear_bias(node)
        if bias is not None:
            updates.append(ConstantUpdate(str(bias.target), writer, "mean-free bias", centre_outputs))
    return updates


def _stream_check(qgraph: QGraph, st: Structure) -> tuple[str | None, list[fx.Node]]:
    """Centring is exact only if the stream is read by LayerNorms (and the adds) alone, and starts at
    embedding lookups. Returns (the problem, or None; the embedding nodes to centre)."""
    stream = st.residual
    assert stream is not None
    start = qgraph.node(stream.sources[0])
    embeddings = _embedding_leaves(start)
    if embeddings is None:
        return (
            f"the stream starts at `{start.name}`, not at embedding lookups; LayerNorms left as they are",
            [],
        )
    members = set(stream.adds) | {n.name for n in _add_tree(start)}
    for name in sorted(members) + stream.writers + [e.name for e in embeddings]:
        for user in P.passthrough_users(qgraph.node(name)):
            if user.name not in members and not P.is_op(user, P.LAYER_NORM_OPS):
                return (
                    f"`{name}` on the residual stream is also read by `{user.name}`, which is not a LayerNorm, "
                    "so a mean-free stream would change it; LayerNorms left as they are"
                ), []
    return None, embeddings


def _add_tree(node: fx.Node) -> list[fx.Node]:
    """The adds that sum embedding lookups into the stream's start (token + position + type)."""
    node = P.skip_passthrough_back(node)
    if P.is_op(node, P.ADD_OPS):
        return [node] + [n for a in node.args[:2] if isinstance(a, fx.Node) for n in _add_tree(a)]
    return []


def _embedding_leaves(node: fx.Node) -> list[fx.Node] | None:
    node = P.skip_passthrough_back(node)
    if P.is_op(node, P.EMBEDDING_OPS) and P.is_constant(node.args[0]):
        return [node]
    if P.is_op(node, P.ADD_OPS) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        leaves = [_embedding_leaves(a) for a in node.args[:2]]
        return None if any(x is None for x in leaves) else [n for x in leaves for n in x]  # type: ignore[union-attr]
    return None


def _layer_norm_to_rms(qgraph: QGraph, ln: fx.Node) -> None:
    """A weightless LayerNorm on a mean-free stream as the decomposed RMSNorm the analysis matches:
    ``x · rsqrt(mean(x², -1) + ε)`` (the variance of a mean-free row is its mean square)."""
    x = ln.args[0]
    eps = float(ln.args[4]) if len(ln.args) > 4 and ln.args[4] is not None else 1e-5
    sq = qgraph.insert_call(aten.pow.Tensor_Scalar, (x, 2), ln, ln)
    mean = qgraph.insert_call(aten.mean.dim, (sq, [-1], True), ln, ln)
    shifted = qgraph.insert_call(aten.add.Tensor, (mean, eps), ln, ln)
    inv = qgraph.insert_call(aten.rsqrt.default, (shifted,), ln, ln)
    out = qgraph.insert_call(aten.mul.Tensor, (x, inv), ln, ln)
    ln.replace_all_uses_with(out)
    qgraph.graph.erase_node(ln)


def _summary(report: dict[str, Any]) -> str:
    lines = [
        f"{len(report['fused'])} norms fused, {len(report['not_fused'])} not fused; "
        f"{report['weightless_norms']}/{report['norms']} norms weightless now"
    ]
    untied = [u for f in report["fused"] for u in f["untied"]]
    if untied:
        lines.append(f"  untied: {', '.join(untied)}")
    if report["centring"]:
        c = report["centring"]
        lines.append(
            f"  stream centred: {len(c['embeddings'])} embeddings, {len(c['writers'])} writers; "
            f"{len(c['layer_norm_to_rms_norm'])} LayerNorms → RMSNorm"
            if c["centred"]
            else f"  not centred: {c['reason']}"
        )
    for n in report["not_fused"][:3]:
        lines.append(f"  not fused `{n['norm']}`: {n['reason']}")
    return "\n".join(lines)
