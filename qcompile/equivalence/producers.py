"""Absorb rules: how each half of ``T·T⁻¹`` goes into a constant (computed in float64, written later).

| where                | constant            | update                       | method                        |
|----------------------|---------------------|------------------------------|-------------------------------|
| norm output          | γ, β                | ``γ T``, ``β T`` (diagonal)  | SmoothQuant: ``γ_j /= s_j``   |
| linear output        | W [out, in], b      | ``W ← Tᵀ W``, ``b ← b T``    | SmoothQuant prev-linear rows; |
|                      |                     |                              | QuaRot writers ``W ← Qᵀ W``   |
| embedding output     | E [vocab, dim]      | ``E ← E T``                  | QuaRot R1                     |
| consumer linear      | W [out, in]         | ``W ← W T⁻ᵀ`` (channel map)  | SmoothQuant ``W_:,j · s_j``   |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompile.analysis import patterns as P
from qcompile.analysis.structure import NormSite
from qcompile.equivalence.errors import Refusal
from qcompile.equivalence.regions import EmbeddingSource, LinearSource, NormSource, Region, Source
from qcompile.equivalence.transforms import Transform
from qcompile.ir import QGraph


@dataclass
class ConstantUpdate:
    """One half absorbed into one constant, as one reader (a node) sees it."""

    target: str  # get_attr target of the constant
    reader: str  # the node that reads it (linear, embedding, the norm's γ-mul / layer_norm)
    role: str  # "producer rows", "producer bias", "embedding columns", "norm γ", "norm β", "consumer columns"
    update: Callable[[torch.Tensor], torch.Tensor]  # float64 value -> float64 value


def _norm_updates(qgraph: QGraph, norm: NormSite, transform: Transform) -> list[ConstantUpdate]:
    if not transform.diagonal:
        raise Refusal(
            f"a norm's γ scales each channel separately, so it can absorb only a diagonal map, not {transform}",
            "rotate the residual stream instead (residual_region, after fuse_norms)",
        )
    if norm.weight is None:
        raise Refusal(
            f"norm `{norm.output}` has no γ to absorb diag(1/s) (it was fused away)",
            "smooth before fuse_norms, or smooth the linears' inputs through their producers instead",
        )
    nodes = {n.name: n for n in qgraph.graph.nodes}
    updates = []
    for target, role in ((norm.weight, "norm γ"), (norm.bias, "norm β")):
        if target is None:
            continue
        readers = [
            n
            for n in norm.nodes
            if any(a.op == "get_attr" and a.target == target for a in nodes[n].all_input_nodes)
        ]
        if not readers:
            raise Refusal(f"no node of norm `{norm.output}` reads {role} `{target}`", "re-run analysis")
        updates += [ConstantUpdate(target, r, role, transform.forward) for r in readers]
    return updates


def _linear_source_updates(node: fx.Node, transform: Transform) -> list[ConstantUpdate]:
    # y T = x (Wᵀ T) + b T, so W ← (Wᵀ T)ᵀ = Tᵀ W and b ← b T.
    updates = [
        ConstantUpdate(
            str(node.args[1].target), node.name, "producer rows", lambda w: transform.forward(w.T).T
        )
    ]
    bias = P.linear_bias(node)
    if bias is not None:
        updates.append(ConstantUpdate(str(bias.target), node.name, "producer bias", transform.forward))
    return updates


def producer_updates(
    qgraph: QGraph, region: Region, source: Source, transform: Transform
) -> list[ConstantUpdate]:
    """The ``x → x T`` half, absorbed into ``source``'s constants."""
    node = qgraph.node(source.node)
    if isinstance(source, NormSource):
        norm = next(n for n in region.norms if n.output == source.norm)
        return _norm_updates(qgraph, norm, transform)
    if isinstance(source, LinearSource):
        return _linear_source_updates(node, transform)
    if isinstance(source, EmbeddingSource):
        return [ConstantUpdate(str(node.args[0].target), node.name, "embedding columns", transform.forward)]
    raise Refusal(
        f"unknown source kind {type(source).__name__}", "use NormSource, LinearSource or EmbeddingSource"
    )


def consumer_update(
    qgraph: QGraph, sink: str, transform: Transform, channel_map: torch.Tensor
) -> ConstantUpdate:
    """The ``W → W T⁻ᵀ`` half for one sink linear; ``channel_map`` comes from the region check."""
    node = qgraph.node(sink)
    return ConstantUpdate(
        str(node.args[1].target),
        sink,
        "consumer columns",
        lambda w: transform.inverse_transpose(w, channel_map),
    )
