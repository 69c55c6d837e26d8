"""The IR verifier: what every pass must leave true of a QGraph (run after every pass by the
``VerifyIR`` instrument, ``QCOMPILE_VERIFY_IR=1``; the test suite turns it on).

- the FX graph lints (topological order, every use defined);
- every placeholder, constant and op result carries ``meta["val"]`` (passes read shapes and dtypes
  from it without running the graph);
- every ``get_attr`` names a tensor the graph module owns (no constant freed while still read);
- the structural analysis, when the graph has one, names only nodes that still exist;
- ``node.meta["qcompile"]`` holds only documented keys (:mod:`qcompile.ir.keys`).
"""

from __future__ import annotations

from qcompile.ir import keys
from qcompile.ir.qgraph import QGraph

_VALUED = ("placeholder", "get_attr", "call_function")


def verify(qgraph: QGraph) -> list[str]:
    """Every problem found, as one line each (empty: the IR is well formed)."""
    problems: list[str] = []
    try:
        qgraph.graph.lint()
    except Exception as exc:  # lint raises RuntimeError with the offending node
        problems.append(f"the FX graph does not lint: {exc}")
    for node in qgraph.graph.nodes:
        if node.op in _VALUED and "val" not in node.meta:
            problems.append(f"`{node.name}` ({node.op} {node.target}) has no meta['val']")
        if node.op == "get_attr":
            try:
                qgraph.get_constant(node)
            except (AttributeError, TypeError) as exc:
                problems.append(f"constant `{node.target}` read by `{node.name}` is gone ({exc})")
        unknown = set(node.meta.get(keys.NAMESPACE, {})) - set(keys.KEYS)
        if unknown:
            problems.append(f"`{node.name}` carries undocumented annotation(s) {sorted(unknown)}")
    problems += structure_problems(qgraph)
    return problems


def structure_problems(qgraph: QGraph) -> list[str]:
    """The structural analysis, when the graph has one, must name only nodes that still exist."""
    structure = qgraph.info.get(keys.INFO_STRUCTURE)
    if structure is None:
        return []
    live = {n.name for n in qgraph.graph.nodes}
    named = [
        *structure.linears,
        *structure.norms,
        *(a.attention_node for a in structure.attentions),
        *(e.node for e in structure.embeddings),
    ]
    dead = [n for n in named if n not in live]
    if not dead:
        return []
    return [
        f"the structural analysis names {len(dead)} node(s) the graph no longer has, e.g. `{dead[0]}` "
        "(a pass changed the graph without re-running analyze or dropping the structure)"
    ]
