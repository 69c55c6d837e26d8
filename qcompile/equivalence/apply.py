"""Insert ``T·T⁻¹`` over a region and absorb both halves: the entry points passes call.

Passes decide *what* T is (SmoothQuant scales, a Hadamard, a learned rotation); these functions check
*where* it can go (:func:`check_region`), merge in float64, and modify the QGraph in place (callers
pass a copy). Each returns an :class:`AbsorbReport` of the constants that changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qcompile.equivalence.constants import ConstantChange, write_updates
from qcompile.equivalence.errors import EquivalenceError, Refusal
from qcompile.equivalence.producers import consumer_update, producer_updates
from qcompile.equivalence.regions import Region
from qcompile.equivalence.transforms import (
    Composite,
    Transform,
    block_orthogonal,
    dense_orthogonal,
    diagonal_scale,
)
from qcompile.equivalence.walk import RegionCheck, check_region
from qcompile.ir import QGraph

# Two scales (or maps) count as tied when they agree to this relative tolerance.
TIE_RTOL = 1e-6


@dataclass
class AbsorbReport:
    """What one application changed: JSON-able through :meth:`to_dict`."""

    region: str
    transform: str
    sources: list[str]
    sinks: list[str]
    changes: list[ConstantChange] = field(default_factory=list)
    path: list[str] = field(default_factory=list)  # nodes T passed between sources and sinks

    @property
    def untied(self) -> list[str]:
        """``original -> copy (reader)`` for every constant that was copied for one reader."""
        return [f"{c.original} -> {c.target} ({c.reader})" for c in self.changes if c.untied]

    def to_dict(self) -> dict:
        return {
            "region": self.region,
            "transform": self.transform,
            "sources": self.sources,
            "sinks": self.sinks,
            "path": self.path,
            "untied": self.untied,
            "changes": [c.to_dict() for c in self.changes],
        }

    def summary(self) -> str:
        tied = f", untied {len(self.untied)}" if self.untied else ""
        return f"{self.transform} over {self.region}: {len(self.changes)} constants changed{tied}"


def _refusal_error(
    region: Region, transform: str, refusal: Refusal, pass_name: str, what: str, node: str | None = None
) -> EquivalenceError:
    node = node or (region.sources[0].node if region.sources else "?")
    return EquivalenceError(
        pass_name,
        transform=transform,
        node=node,
        op=what,
        reason=refusal.reason,
        way_out=refusal.way_out,
        region=region.name,
    )


def apply_transform(qgraph: QGraph, region: Region, transform: Transform, pass_name: str) -> AbsorbReport:
    """Check ``region`` for ``transform``, then absorb ``x → x T`` into every source and ``W → W T⁻ᵀ``
    into every sink, in place. Raises :class:`EquivalenceError` (nothing changed) if any half cannot go."""
    check = check_region(qgraph, region, transform, pass_name)
    updates = []
    for source in region.sources:
        try:
            updates += producer_updates(qgraph, region, source, transform)
        except Refusal as refusal:
            what = f"source {type(source).__name__}"
            raise _refusal_error(
                region, transform.describe(), refusal, pass_name, what, source.node
            ) from None
    updates += [consumer_update(qgraph, s, transform, check.sink_maps[s]) for s in region.sinks]
    changes, graph_changed = write_updates(qgraph, updates)
    if graph_changed:
        qgraph.recompile()
    return AbsorbReport(
        region.name,
        transform.describe(),
        [s.node for s in region.sources],
        list(region.sinks),
        changes,
        check.path,
    )


# ---- values given per consumer channel (GQA) -------------------------------------------------------


def _to_source_space(
    values: torch.Tensor, check: RegionCheck, region: Region, pass_name: str, what: str
) -> torch.Tensor:
    """Values given per consumer input channel (``values[i]``, a scale or a per-head block) as values per
    source channel, refusing when consumer channels that read the same source channel disagree."""
    width = values.shape[0]
    out = torch.empty((region.channels, *values.shape[1:]), dtype=values.dtype)
    filled = torch.zeros(region.channels, dtype=torch.bool)
    for sink, cmap in check.sink_maps.items():
        if cmap.numel() != width:
            raise _tie_error(
                region, pass_name, sink, what, f"{width} values given, the consumer reads {cmap.numel()}"
            )
        for src in torch.unique(cmap).tolist():
            idx = (cmap == src).nonzero().flatten()
            group = values[idx]
            if not torch.allclose(group, group[:1].expand_as(group), rtol=TIE_RTOL, atol=0.0):
                raise _tie_error(region, pass_name, sink, what, _untied_text(region, idx, src))
            if filled[src] and not torch.allclose(out[src], group[0], rtol=TIE_RTOL, atol=0.0):
                raise _tie_error(region, pass_name, sink, what, f"the sinks disagree on source channel {src}")
            out[src], filled[src] = group[0], True
    # Channels no consumer reads: any value is exact; keep them unchanged (scale 1, identity block).
    out[~filled] = 1.0 if values.dim() == 1 else torch.eye(values.shape[-1], dtype=values.dtype)
    return out


def _untied_text(region: Region, idx: torch.Tensor, src: int) -> str:
    if region.heads is None:
        return f"consumer channels {idx.tolist()} read source channel {src} but get different values"
    d = region.heads.head_dim
    heads = sorted({i // d for i in idx.tolist()})
    return (
        f"query heads {heads} share KV head {src // d} (GQA: v is shared by the group), so their o columns "
        f"must get the same values, but they differ (channel {src % d} of the head)"
    )


def _tie_error(region: Region, pass_name: str, sink: str, what: str, reason: str) -> EquivalenceError:
    return EquivalenceError(
        pass_name,
        transform=what,
        node=sink,
        op="aten.linear.default",
        reason=reason,
        way_out="tie the values across each KV group (e.g. the max over the group), give them per source "
        "channel, or skip this region (QQQ skips v→o for GQA)",
        region=region.name,
    )


def _build(region: Region, pass_name: str, what: str, make):
    try:
        return make()
    except Refusal as refusal:
        raise _refusal_error(region, what, refusal, pass_name, "transform") from None


def apply_diagonal(qgraph: QGraph, region: Region, s: torch.Tensor, pass_name: str) -> AbsorbReport:
    """``T = diag(1/s)`` (SmoothQuant eq. 3): sources divide channel j by ``s_j``, sinks multiply column j
    by ``s_j``. ``s`` is per source channel (``region.channels``) or per sink input channel; for v→o with
    GQA the latter must be tied across each KV group."""
    s = torch.as_tensor(s).detach().reshape(-1).to("cpu", torch.float64)
    if s.numel() != region.channels:
        # Per consumer channel: walk once with a stand-in of the same sign pattern (ReLU cares) to learn
        # each sink's channel map, then fold s onto the source channels (refusing untied GQA scales).
        sign = 1.0 if bool((s > 0).all()) else -1.0
        stand_in = diagonal_scale(torch.full((region.channels,), sign))
        s = _to_source_space(
            s, check_region(qgraph, region, stand_in, pass_name), region, pass_name, "diag(1/s)"
        )
    transform = _build(region, pass_name, "diag(1/s)", lambda: diagonal_scale(s))
    return apply_transform(qgraph, region, transform, pass_name)


def _rotation(qgraph: QGraph, region: Region, q: torch.Tensor, pass_name: str) -> Transform:
    """Q as a transform on the region's source channels: dense, or per head for per-head regions."""
    q = torch.as_tensor(q).detach().to("cpu", torch.float64)
    heads = region.heads
    if heads is None or (q.dim() == 2 and q.shape[0] == region.channels != heads.head_dim):
        # Dense Q. On a per-head region the walk refuses it at the attention op, naming it.
        return _build(region, pass_name, "Q", lambda: dense_orthogonal(q))
    d, kv = heads.head_dim, region.channels // heads.head_dim
    if q.dim() == 3 and q.shape[0] != kv:
        # One block per consumer (query) head: tied per KV group, or refused. Give each o column its
        # head's block, then map to source channels as for scales.
        check = check_region(
            qgraph, region, block_orthogonal(torch.eye(d, dtype=torch.float64), kv), pass_name
        )
        per_channel = q.repeat_interleave(d, dim=0)  # [num_heads·d, d, d]
        q = _to_source_space(per_channel, check, region, pass_name, "per-head H")[::d]
    return _build(region, pass_name, "per-head H", lambda: block_orthogonal(q, kv))


def apply_orthogonal(qgraph: QGraph, region: Region, q: torch.Tensor, pass_name: str) -> AbsorbReport:
    """``T = Q`` orthogonal (QuaRot/SpinQuant): sources ``x → x Q`` (``E ← E Q``, writers ``W ← Qᵀ W``,
    ``b ← Qᵀ b``), sinks ``W ← W Q``. For a per-head region (v→o, R2) ``q`` is one ``[head_dim, head_dim]``
    map for every head, ``[num_kv_heads, d, d]``, or ``[num_heads, d, d]`` tied per KV group."""
    return apply_transform(qgraph, region, _rotation(qgraph, region, q, pass_name), pass_name)


def apply_scaled_orthogonal(
    qgraph: QGraph, region: Region, s: torch.Tensor, q: torch.Tensor, pass_name: str
) -> AbsorbReport:
    """``T = diag(1/s)·Q`` (SmoothRot / OSTQuant): scale, then rotate, merged in one float64 step. Every op
    on the way must commute with both (so no norms and no elementwise products); ``s`` per source channel."""
    scale = _build(region, pass_name, "diag(1/s)·Q", lambda: diagonal_scale(s))
    rotation = _rotation(qgraph, region, q, pass_name)
    return apply_transform(qgraph, region, Composite(scale, rotation), pass_name)
