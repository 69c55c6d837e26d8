"""Writing absorbed halves into constants: float64 merges, cast back, untie shared constants.

All updates of one region are computed from the *original* values in float64 (a linear that is both a
source and a sink gets both halves, composed), then cast back to each constant's dtype. A constant
read by a node the region does not cover (e.g. a tied embedding when only lm_head is a sink), or by
two covered readers that end up with different values, is copied first so that only the intended
reader changes ("untied"); the copy is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompile.equivalence.producers import ConstantUpdate
from qcompile.ir import QGraph, keys


@dataclass
class ConstantChange:
    """One constant as one reader now sees it."""

    target: str  # the constant the reader reads now (a new one when untied)
    original: str  # the constant it was derived from
    reader: str  # the node reading it
    roles: list[str]  # which halves went in, e.g. ["producer rows", "consumer columns"]
    shape: tuple[int, ...]
    dtype: str
    untied: bool  # True: a private copy was made for this reader
    max_abs_change: float  # max |new − old|, in the constant's dtype

    def to_dict(self) -> dict:
        return dict(self.__dict__, shape=list(self.shape))


def readers_of(qgraph: QGraph, target: str) -> list[fx.Node]:
    """Every node that reads constant ``target`` (through any of its get_attr nodes), in graph order."""
    out: list[fx.Node] = []
    for node in qgraph.graph.nodes:
        if node.op == "get_attr" and str(node.target) == target:
            out += [u for u in node.users if u not in out]
    order = {n: i for i, n in enumerate(qgraph.graph.nodes)}
    return sorted(out, key=order.__getitem__)


def _rewire(qgraph: QGraph, reader: fx.Node, original: str, value: torch.Tensor) -> str:
    """Give ``reader`` its own copy of constant ``original``; returns the new target."""
    old_attrs = [a for a in reader.all_input_nodes if a.op == "get_attr" and str(a.target) == original]
    new_attr = qgraph.add_constant(f"{original}_{reader.name}", value, before=old_attrs[0])
    for old in old_attrs:
        reader.replace_input_with(old, new_attr)
        if not old.users:
            qgraph.graph.erase_node(old)
    _retarget_structure(qgraph, reader, original, str(new_attr.target))
    return str(new_attr.target)


def _retarget_structure(qgraph: QGraph, reader: fx.Node, old: str, new: str) -> None:
    """Keep the analysis' Structure (and node annotations) pointing at the constants readers really use."""
    structure = qgraph.info.get(keys.INFO_STRUCTURE)
    sites = [keys.get(reader).get(keys.LINEAR)]
    if structure is not None:
        sites.append(structure.linears.get(reader.name))
        sites += [e for e in structure.embeddings if e.node == reader.name]
        sites += [n for n in structure.norms.values() if reader.name in n.nodes]
    for site in sites:
        for attr in ("weight", "bias"):
            if site is not None and getattr(site, attr, None) == old:
                setattr(site, attr, new)
    if structure is not None and structure.lm_head is not None:
        head = structure.linears[structure.lm_head].weight
        structure.tied_embedding = any(e.weight == head for e in structure.embeddings)


def _compose(
    ups: list[ConstantUpdate], original: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Each reader's new value: its halves applied in turn to the original, in float64 (QuaRot and
    SpinQuant merge in float64), plus the roles that went in."""
    work: dict[str, torch.Tensor] = {}
    roles: dict[str, list[str]] = {}
    for u in ups:
        work[u.reader] = u.update(work.get(u.reader, original.detach().to("cpu", torch.float64)))
        roles.setdefault(u.reader, []).append(u.role)
    return work, roles


def _write_target(qgraph: QGraph, target: str, ups: list[ConstantUpdate]) -> list[ConstantChange]:
    original = qgraph.get_constant(target)
    work, roles = _compose(ups, original)
    readers = readers_of(qgraph, target)
    covered = [r for r in readers if r.name in work]
    uncovered = [r for r in readers if r.name not in work]
    values = list(work.values())
    # Every reader covered and all get the same value (e.g. a tied embedding and lm_head under Q): no copy.
    shared = not uncovered and all(torch.equal(values[0], v) for v in values[1:])
    keep = covered[0].name if covered and not uncovered else None  # this reader keeps the target itself
    changes = []
    for reader in covered:
        new = work[reader.name].to(original.dtype).to(original.device)
        untie = not shared and reader.name != keep
        if untie:
            now = _rewire(qgraph, reader, target, new)
        else:
            qgraph.set_constant(target, new)
            now = target
        delta = float((new.double() - original.double()).abs().max()) if new.numel() else 0.0
        dtype = str(new.dtype).replace("torch.", "")
        changes.append(
            ConstantChange(
                now, target, reader.name, roles[reader.name], tuple(new.shape), dtype, untie, delta
            )
        )
    return changes


def write_updates(qgraph: QGraph, updates: list[ConstantUpdate]) -> tuple[list[ConstantChange], bool]:
    """Apply ``updates``; returns the changes and whether the graph itself changed (a constant untied)."""
    by_target: dict[str, list[ConstantUpdate]] = {}
    for u in updates:
        by_target.setdefault(u.target, []).append(u)
    changes = [c for target, ups in by_target.items() for c in _write_target(qgraph, target, ups)]
    return changes, any(c.untied for c in changes)
