"""The equivalence-check instrument: float outputs before vs after each equivalence pass, against
the pass's declared tolerance; on failure, the first node whose divergence reaches the output.

Split from :mod:`qcompile.pipeline.instruments` (which re-exports everything here) to keep one idea per file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from qcompile.ir import QGraph, keys
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult
from qcompile.pipeline.instruments.base import Instrument

# ---- equivalence check -------------------------------------------------------------------------

# Used when an equivalence pass declares no tolerance (it should): float32 reassociation noise is ~1e-6.
DEFAULT_TOLERANCE = 1e-4
_TINY = 1e-30
# Report key: names of nodes whose values an equivalence pass changes on purpose (the inside of a
# region, between T and T^-1). Localization never blames them, which matters when the fault sits
# downstream of a legitimate transform on the same path.
TRANSFORMED_NODES = keys.REPORT_TRANSFORMED_NODES


def relative_error(reference: Any, value: Any) -> float | None:
    """max|a-b| / max(max|a|, tiny) over every tensor leaf (computed in float64); None when the two
    cannot be compared (different structure, shape, or no tensors). A NaN pattern change is inf."""
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    val_leaves, val_spec = pytree.tree_flatten(value)
    if ref_spec != val_spec:
        return None
    worst: float | None = None
    for a, b in zip(ref_leaves, val_leaves, strict=True):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                return None
            continue
        a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
        if a.numel() == 0:
            err = 0.0
        elif not torch.equal(a.isnan(), b.isnan()):
            err = float("inf")
        else:
            a, b = a.nan_to_num(nan=0.0), b.nan_to_num(nan=0.0)
            err = float((a - b).abs().max()) / max(float(a.abs().max()), _TINY)
        worst = err if worst is None else max(worst, err)
    return worst


class _RecordingInterpreter(fx.Interpreter):
    """Runs a graph and keeps every node's output by node name (for localizing a divergence)."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__(graph_module)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _record_values(qgraph: QGraph, flat_inputs: list[Any]) -> dict[str, Any]:
    interp = _RecordingInterpreter(qgraph.graph_module)
    with torch.no_grad():
        interp.run(*flat_inputs)
    return interp.values


def _activation_nodes(graph: fx.Graph) -> set[str]:
    """Nodes that depend on an input. Constant-only nodes are weight preparation, which an
    equivalence pass changes on purpose, so they are never blamed."""
    live: set[str] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a.name in live for a in n.all_input_nodes):
            live.add(n.name)
    return live


@dataclass
class NodeDivergence:
    node: str
    label: str  # node name plus its module, for messages
    error: float


def localize_divergence(
    before: QGraph,
    after: QGraph,
    flat_inputs: list[Any],
    tolerance: float,
    transformed: Iterable[str] = (),
) -> list[NodeDivergence]:
    """Nodes of ``after`` (topological order) whose value differs from the same-named node of
    ``before`` by more than ``tolerance`` and whose divergence persists to the graph output.

    Persistence matters because an equivalence transform changes intermediates on purpose (a smoothed
    norm output is x/s) and undoes it downstream (the next linear); such a healed divergence is not the
    fault. A node is persistent when a path of diverging (or incomparable, e.g. newly inserted) nodes
    leads from it to the output. The first entry is the node to blame. Nodes in ``transformed``
    (declared by the pass) carry divergence along paths but are never blamed; without that declaration
    a fault downstream of a legitimate transform on the same path is blamed on the transform's first
    node (the graph alone cannot tell them apart).
    """
    transformed = set(transformed)
    ref = _record_values(before, flat_inputs)
    new = _record_values(after, flat_inputs)
    live = _activation_nodes(after.graph)
    errors: dict[str, float | None] = {}
    for n in after.graph.nodes:
        if n.op not in ("placeholder", "get_attr", "output") and n.name in ref:
            errors[n.name] = relative_error(ref[n.name], new.get(n.name))
    persistent: set[str] = set()
    for n in reversed(list(after.graph.nodes)):
        if n.op == "output":
            persistent.add(n.name)
            continue
        err = errors.get(n.name)
        diverges = err is None or err > tolerance  # incomparable nodes pass divergence through
        if diverges and any(u.name in persistent for u in n.users):
            persistent.add(n.name)
    return [
        NodeDivergence(n.name, after.display_name(n), errors[n.name])  # type: ignore[arg-type]
        for n in after.graph.nodes
        if n.name in persistent
        and n.name in live
        and n.name not in transformed
        and errors.get(n.name) is not None
    ]


@dataclass
class EquivalenceRecord:
    """The measured float-output error of one checked pass."""

    pass_name: str
    tolerance: float
    max_error: float
    output_errors: list[float | None]
    passed: bool


class EquivalenceCheck(Instrument):
    """Check that equivalence passes keep the float outputs (docs/architecture.md: "the manager can check the float
    output before/after on sample inputs and fail the pipeline with the pass name and the worst node").

    Checked: passes of kind ``equivalence`` and any pass declaring a ``tolerance``. The graph before and
    after the pass runs on each sample input (``sample_inputs`` here, else ``ctx.sample_inputs``; each a
    tuple of positional args); the error of an output is ``max|a-b| / max(max|a|, tiny)``. Every
    checked pass gets ``report["equivalence_check"]`` (so passing checks show their numbers too) and a
    :class:`EquivalenceRecord` in :attr:`records`. Over tolerance, it raises :class:`PassError` naming
    the pass and the first node whose divergence persists to the output (see
    :func:`localize_divergence`).
    """

    needs_before_copy = True

    def __init__(
        self, sample_inputs: list[tuple] | None = None, default_tolerance: float | None = None
    ) -> None:
        self.sample_inputs = sample_inputs
        self.default_tolerance = DEFAULT_TOLERANCE if default_tolerance is None else default_tolerance
        self.records: list[EquivalenceRecord] = []
        self._before: Any = None

    def applies_to(self, pass_: Pass) -> bool:
        return pass_.kind == "equivalence" or getattr(pass_, "tolerance", None) is not None

    def wants_before_copy(self, pass_: Pass) -> bool:
        return self.applies_to(pass_)

    def tolerance_for(self, pass_: Pass) -> float:
        tol = getattr(pass_, "tolerance", None)
        return self.default_tolerance if tol is None else float(tol)

    def before_pipeline(self, ir: Any, ctx: PassContext) -> None:
        self.records = []

    def before_pass(self, pass_: Pass, ir: Any, ctx: PassContext) -> None:
        self._before = ir if self.applies_to(pass_) else None

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        before, self._before = self._before, None
        after = result.ir
        if before is None or not (hasattr(before, "run_flat") and hasattr(after, "run_flat")):
            return
        samples = self.sample_inputs if self.sample_inputs is not None else ctx.sample_inputs
        if not samples:
            raise PassError(
                pass_.name,
                "EquivalenceCheck has no sample inputs; set PassContext.sample_inputs or pass "
                "EquivalenceCheck(sample_inputs=[(x,), ...])",
            )
        samples = [sample if isinstance(sample, tuple) else (sample,) for sample in samples]
        tolerance = self.tolerance_for(pass_)
        per_output: list[float | None] = []
        worst_sample, worst_error = 0, -1.0
        for i, args in enumerate(samples):
            flat = _flatten(before, args)
            errors = self._output_errors(before.run_flat(flat), after.run_flat(flat), pass_)
            per_output = _elementwise_max(per_output, errors)
            sample_error = max((e for e in errors if e is not None), default=0.0)
            if sample_error > worst_error:
                worst_sample, worst_error = i, sample_error
        record = EquivalenceRecord(pass_.name, tolerance, worst_error, per_output, worst_error <= tolerance)
        self.records.append(record)
        result.report["equivalence_check"] = asdict(record) | {"samples": len(samples)}
        if not record.passed:
            if not (isinstance(before, QGraph) and isinstance(after, QGraph)):
                raise PassError(
                    pass_.name,
                    f"changed the outputs by {record.max_error:.3g} (relative), over its tolerance "
                    f"{record.tolerance:.3g}",
                )
            flat = before.flatten_inputs(samples[worst_sample])
            raise self._divergence_error(pass_, before, after, result.report, flat, record)

    @staticmethod
    def _output_errors(ref: Any, out: Any, pass_: Pass) -> list[float | None]:
        ref_leaves, out_leaves = pytree.tree_leaves(ref), pytree.tree_leaves(out)
        if len(ref_leaves) != len(out_leaves):
            raise PassError(
                pass_.name, f"changed the number of graph outputs ({len(ref_leaves)} -> {len(out_leaves)})"
            )
        errors = [relative_error(a, b) for a, b in zip(ref_leaves, out_leaves, strict=True)]
        for i, (a, e) in enumerate(zip(ref_leaves, errors, strict=True)):
            if e is None and isinstance(a, torch.Tensor):
                raise PassError(pass_.name, f"changed graph output {i} (shape/type {tuple(a.shape)} differs)")
        return errors

    @staticmethod
    def _divergence_error(
        pass_: Pass,
        before: QGraph,
        after: QGraph,
        after_report: dict[str, Any],
        flat: list[Any],
        record: EquivalenceRecord,
    ) -> PassError:
        transformed = after_report.get(TRANSFORMED_NODES, ())
        chain = localize_divergence(before, after, flat, record.tolerance, transformed)
        outputs = ", ".join(f"{i}: {e:.3g}" for i, e in enumerate(record.output_errors) if e is not None)
        head = (
            f"equivalence check failed: max relative output error {record.max_error:.3g} > tolerance "
            f"{record.tolerance:.3g} (per output {outputs})"
        )
        if not chain:
            return PassError(pass_.name, head + "; no single node exceeds the tolerance (accumulated error)")
        path = " -> ".join(f"{d.label} {d.error:.3g}" for d in chain[:6]) + (
            " -> ..." if len(chain) > 6 else ""
        )
        return PassError(
            pass_.name,
            f"{head}; first diverging node `{chain[0].label}` (relative error {chain[0].error:.3g}); "
            f"divergence path: {path}. Fix the pass; if this error is expected, raise the pass's tolerance",
            node=chain[0].node,
        )

    def table(self) -> str:
        lines = [f"{'pass':<24} {'max rel err':>12} {'tolerance':>10}  ok"]
        for r in self.records:
            lines.append(
                f"{r.pass_name:<24} {r.max_error:>12.3g} {r.tolerance:>10.3g}  {'yes' if r.passed else 'NO'}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"EquivalenceCheck(default_tolerance={self.default_tolerance})"


def _flatten(ir: Any, args: tuple) -> list[Any]:
    """Positional sample inputs as the IR's flat inputs (a QGraph flattens nested tuples)."""
    return ir.flatten_inputs(args) if hasattr(ir, "flatten_inputs") else list(args)


def _elementwise_max(acc: list[float | None], new: list[float | None]) -> list[float | None]:
    if not acc:
        return list(new)
    return [b if a is None else a if b is None else max(a, b) for a, b in zip(acc, new, strict=True)]
