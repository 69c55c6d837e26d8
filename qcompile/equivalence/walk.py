"""The region check: walk the graph from every source output to the sinks, op by op.

Every node that reads a value carrying ``T`` must either be a sink linear (its input), a whole norm
the transform commutes with, or an op with a commute rule (:mod:`qcompile.equivalence.commute`).
Anything else — another user of a source output, a GELU on the way, a sink that nothing reaches —
raises :class:`EquivalenceError` naming the node, the op, the reason and the way out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from qcompile.analysis import patterns as P
from qcompile.analysis.structure import NormSite
from qcompile.equivalence.commute import Step, op_label, pass_norm, pass_op
from qcompile.equivalence.errors import EquivalenceError, Refusal
from qcompile.equivalence.probes import ConcreteSizes, constant_row, seed_probe
from qcompile.equivalence.regions import EmbeddingSource, LinearSource, NormSource, Region, Source
from qcompile.equivalence.transforms import Transform
from qcompile.ir import QGraph


@dataclass
class RegionCheck:
    """What the walk proved: each sink's channel map, and the nodes T passes on the way."""

    region: Region
    transform: str
    # sink linear -> source channel read by each of its input channels (GQA: repeated per group)
    sink_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    path: list[str] = field(default_factory=list)


class _Walk:
    def __init__(self, qgraph: QGraph, region: Region, transform: Transform, pass_name: str) -> None:
        self.qgraph, self.region, self.transform, self.pass_name = qgraph, region, transform, pass_name
        self.nodes = {n.name: n for n in qgraph.graph.nodes}
        self.norm_of = {name: norm for norm in region.norms for name in norm.nodes}
        self.sizes = ConcreteSizes()
        self.probes: dict[fx.Node, Any] = {}
        self.handled: set[str] = set()
        self.result = RegionCheck(region, transform.describe())

    def error(self, node: str, op: str, reason: str, way_out: str) -> EquivalenceError:
        return EquivalenceError(
            self.pass_name,
            transform=self.transform.describe(),
            node=node,
            op=op,
            reason=reason,
            way_out=way_out,
            region=self.region.name,
        )

    def node(self, name: str, what: str) -> fx.Node:
        if name not in self.nodes:
            raise self.error(
                name, what, "no node of that name in the graph", "rebuild the region from a fresh analysis"
            )
        return self.nodes[name]

    # ---- sources and sinks -------------------------------------------------------------------------

    def seed(self, source: Source) -> None:
        node = self.node(source.node, type(source).__name__)
        _check_source_kind(self, source, node)
        shape = self.sizes.shape(node)
        if shape[-1] != self.region.channels or self.transform.channels != self.region.channels:
            raise self.error(
                node.name,
                op_label(node),
                f"the source output has {shape[-1]} channels, the region {self.region.channels}, "
                f"the transform {self.transform.channels}",
                "give a transform as wide as the region's source outputs",
            )
        self.probes[node] = seed_probe(shape, self.region.channels)

    def sink(self, node: fx.Node) -> None:
        x = node.args[0]
        others = [a.name for a in node.all_input_nodes if a in self.probes and a is not x]
        if x not in self.probes or others:
            raise self.error(
                node.name, op_label(node), "the transform reaches the weight or bias", "fix the region"
            )
        row = constant_row(self.probes[x])
        reason = (
            "its input's channel map varies over tokens" if row is None else self.transform.row_error(row)
        )
        if reason is not None:
            raise self.error(
                node.name,
                op_label(node),
                f"the linear contracts its input's last dim, but {reason}",
                "apply the map where this linear's input channels are whole",
            )
        self.result.sink_maps[node.name] = row

    # ---- one node ----------------------------------------------------------------------------------

    def visit(self, node: fx.Node) -> None:
        carried = [a for a in node.all_input_nodes if a in self.probes]
        if not carried or node.name in self.handled:
            return
        sinks = self.region.sinks
        if node.name in self.norm_of:
            norm = self.norm_of[node.name]
            try:
                self.through_norm(norm)
            except Refusal as refusal:  # name the norm as a whole: its output node and kind
                raise self.error(norm.output, norm.kind, refusal.reason, refusal.way_out) from None
            return
        try:
            if node.name in sinks and P.is_linear(node):
                self.sink(node)
            elif P.is_op(node, P.LINEAR_OPS):
                raise Refusal(
                    "this linear reads the transformed value but is not a sink of the region "
                    "(or its weight is not a constant)",
                    "add it to the region's sinks, or skip this group",
                )
            else:
                probe = pass_op(Step(node, self.probes, self.sizes, self.transform))
                if probe is not None:
                    self.probes[node] = probe
                    self.result.path.append(node.name)
        except Refusal as refusal:
            raise self.error(node.name, op_label(node), refusal.reason, refusal.way_out) from None

    def through_norm(self, norm: NormSite) -> None:
        x = self.nodes[norm.input]
        if x not in self.probes:
            raise Refusal(
                f"it is inside norm `{norm.output}` but the norm's input does not carry the transform",
                "end the region before this norm",
            )
        step = Step(self.nodes[norm.output], self.probes, self.sizes, self.transform)
        self.probes[self.nodes[norm.output]] = pass_norm(
            self.qgraph, norm, self.transform, self.probes[x], step
        )
        self.handled.update(norm.nodes)
        self.result.path.append(norm.output)

    def run(self) -> RegionCheck:
        seeds = {s.node: s for s in self.region.sources}
        for name in list(seeds) + list(self.region.sinks):
            self.node(name, "region member")
        for node in self.qgraph.graph.nodes:
            self.visit(node)
            if node.name in seeds:
                self.seed(seeds[node.name])
        for name in self.region.sinks:
            if name not in self.result.sink_maps:
                raise self.error(
                    name,
                    op_label(self.nodes[name]),
                    "no source output reaches this sink, so its columns would absorb T⁻¹ for a value without T",
                    "drop it from the region's sinks",
                )
        return self.result


def _check_source_kind(walk: _Walk, source: Source, node: fx.Node) -> None:
    if isinstance(source, NormSource):
        ok = any(n.output == source.norm for n in walk.region.norms)
        what = "a norm output listed in region.norms"
    elif isinstance(source, LinearSource):
        ok, what = P.is_linear(node), "a linear with constant weights"
    elif isinstance(source, EmbeddingSource):
        ok = P.is_op(node, P.EMBEDDING_OPS) and P.is_constant(node.args[0])
        what = "an embedding lookup of a constant table"
    else:
        ok, what = False, "a NormSource, LinearSource or EmbeddingSource"
    if not ok:
        raise walk.error(
            node.name, op_label(node), f"a {type(source).__name__} must be {what}", "fix the region"
        )


def check_region(qgraph: QGraph, region: Region, transform: Transform, pass_name: str) -> RegionCheck:
    """Prove ``T`` can travel from every source output of ``region`` to every sink input, or raise
    :class:`EquivalenceError`. Changes nothing."""
    return _Walk(qgraph, region, transform, pass_name).run()
