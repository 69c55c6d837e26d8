"""Regions: where ``T`` goes in (sources) and where ``T⁻¹`` goes in (sinks), built from the Structure.

A region (after Brevitas' graph equalisation) is a set of *sources* whose outputs meet — through
adds, weightless norms, reshapes — at a set of *sinks*. ``T`` is absorbed at every source output and
``T⁻¹`` at every sink input. Constructors here only say *what* the region is; whether ``T`` may
travel from the sources to the sinks is checked on the graph by :func:`qcompile.equivalence.walk.check_region`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qcompile.analysis.structure import AttentionSite, MLPSite, NormSite, Structure


@dataclass(frozen=True)
class NormSource:
    """A norm's output: absorbs a *diagonal* T into γ (and β) — SmoothQuant's ``γ_j /= s_j``."""

    norm: str  # NormSite.output

    @property
    def node(self) -> str:
        return self.norm


@dataclass(frozen=True)
class LinearSource:
    """A linear's output rows (and bias): ``W ← Tᵀ W``, ``b ← b T``.

    ``via`` says how T reaches the sinks, for reports: ``direct`` (previous linear → next linear),
    ``gated`` (up rows through ``act(gate) * up``, diagonal only), ``attention`` (v rows through
    attention, per-head only), ``residual`` (a writer into the residual stream: o, down).
    """

    node: str
    via: str = "direct"


@dataclass(frozen=True)
class EmbeddingSource:
    """An embedding lookup: the table's columns absorb T, ``E ← E T`` (QuaRot R1)."""

    node: str


Source = NormSource | LinearSource | EmbeddingSource


@dataclass(frozen=True)
class HeadLayout:
    """Attention shape of a per-head region (v→o): T is block-diagonal with ``head_dim`` blocks."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class Region:
    """Sources whose outputs carry ``T`` (width ``channels``) to the input of every sink linear."""

    name: str
    sources: list[Source]
    sinks: list[str]  # linear node names
    channels: int  # width of T: the last dim of every source output
    heads: HeadLayout | None = None  # set for per-head regions (v→o)
    # Norms the walk may meet on the way (as whole units): RMSNorm without γ passes orthogonal maps.
    norms: list[NormSite] = field(default_factory=list)

    def __str__(self) -> str:
        return self.name


class RegionError(ValueError):
    """A region cannot be built from the Structure (e.g. an unknown node name)."""


def _linear_width(structure: Structure, node: str, attr: str) -> int:
    try:
        return getattr(structure.linears[node], attr)
    except KeyError:
        raise RegionError(
            f"`{node}` is not a linear of this graph's Structure (run analysis first)"
        ) from None


def _sinks_of_norm(structure: Structure, norm: NormSite) -> list[str]:
    return [c for c in norm.consumers if c in structure.linears]


def _layer_text(layer: int | None) -> str:
    return f"layer {layer}: " if layer is not None else ""


def region_for_norm(structure: Structure, norm_output: str) -> Region:
    """A norm → the linears reading it (input norm → q,k,v; post-attention norm → gate,up; final norm →
    lm_head). Diagonal T only: γ (and β) absorb ``1/s`` (SmoothQuant)."""
    try:
        norm = structure.norms[norm_output]
    except KeyError:
        raise RegionError(f"`{norm_output}` is not a norm output of this Structure") from None
    sinks = _sinks_of_norm(structure, norm)
    name = f"{_layer_text(norm.layer)}norm `{norm.output}` → {', '.join(sinks)}"
    return Region(name, [NormSource(norm.output)], sinks, norm.dim, norms=list(structure.norms.values()))


def region_for_linear_pair(structure: Structure, producer: str, consumers: list[str]) -> Region:
    """A linear's output rows → the linears reading its output (possibly through ops that commute)."""
    width = _linear_width(structure, producer, "out_features")
    for c in consumers:
        _linear_width(structure, c, "in_features")
    name = f"linear `{producer}` → {', '.join(consumers)}"
    return Region(
        name, [LinearSource(producer)], list(consumers), width, norms=list(structure.norms.values())
    )


def region_for_up_down(structure: Structure, mlp: MLPSite) -> Region:
    """MLP ``up`` rows → ``down`` columns through ``act(gate) * up``: linear in ``up``, so diagonal T
    passes (SmoothQuant/SmoothRot smooth the down_proj input this way). For a plain MLP this is
    fc1 → fc2 through the activation, which only a positive diagonal passes, and only for ReLU."""
    region = region_for_linear_pair(structure, mlp.up, [mlp.down])
    via = "gated" if mlp.kind == "gated" else "direct"
    region.sources = [LinearSource(mlp.up, via)]
    region.name = f"{_layer_text(mlp.layer)}mlp `{mlp.up}` → `{mlp.down}` (through {mlp.activation})"
    return region


def region_for_v_o(structure: Structure, attention: AttentionSite) -> Region:
    """v rows → o columns through attention, per head (R2; SmoothQuant v→o with GQA-tied scales).

    ``channels`` is v's output width, ``num_kv_heads·head_dim``: diagonal scales and per-head maps are
    given per KV head; each query head's o columns get the map of the KV head it reads.
    """
    width = _linear_width(structure, attention.v, "out_features")
    heads = HeadLayout(attention.num_heads, attention.num_kv_heads, attention.head_dim)
    name = f"{_layer_text(attention.layer)}attention v `{attention.v}` → o `{attention.o}`"
    return Region(
        name,
        [LinearSource(attention.v, "attention")],
        [attention.o],
        width,
        heads=heads,
        norms=list(structure.norms.values()),
    )


def residual_region(structure: Structure) -> Region:
    """The whole residual stream (QuaRot/SpinQuant R1): sources are the embedding(s) and the writers
    (o, down); sinks are every linear reading the stream through a norm, and lm_head.

    Legal for orthogonal T only once every norm on the stream is a weightless RMSNorm (fuse_norms);
    the walk refuses otherwise, naming the norm.
    """
    stream = structure.residual
    if stream is None:
        raise RegionError("this graph has no residual stream in its Structure")
    embeddings = {e.node: e for e in structure.embeddings}
    # The stream usually starts at one lookup; when it starts at a sum of lookups (token + position),
    # every embedding is a source and the walk checks that each one really feeds the stream.
    starts = [s for s in stream.sources if s in embeddings]
    if len(starts) != len(stream.sources):
        starts = list(embeddings)
    if not starts:
        raise RegionError("the residual stream does not start at an embedding lookup; no R1 region")
    sources: list[Source] = [EmbeddingSource(s) for s in starts]
    sources += [LinearSource(w, "residual") for w in stream.writers]
    sinks: list[str] = []
    for reader in stream.readers:
        sinks += [c for c in _sinks_of_norm(structure, structure.norms[reader]) if c not in sinks]
    if structure.lm_head is not None and structure.lm_head not in sinks:
        sinks.append(structure.lm_head)
    width = embeddings[starts[0]].dim
    name = f"residual stream ({len(sources)} sources → {len(sinks)} readers)"
    return Region(name, sources, sinks, width, norms=list(structure.norms.values()))
