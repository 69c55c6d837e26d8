"""Instruments: pass-level debugging as plug-ins of the pass manager (after TVM's ``PassInstrument``
and MLIR's ``--mlir-print-ir-after-all`` / ``--mlir-timing``), never flags threaded through passes.

The manager calls, for every instrument::

    before_pipeline(qgraph, ctx)
    for each pass:
        before_pass(pass_, qgraph, ctx)      # in list order
        ... the pass runs ...
        after_pass(pass_, result, ctx)       # in reverse list order (hooks nest like context managers)
        wants_stop(pass_, result, ctx)       # any True ends the pipeline after this pass
    after_pipeline(pipeline_result, ctx)
    on_error(pass_, error, qgraph, ctx)      # instead of the rest, when a pass or a check fails

An instrument whose :meth:`Instrument.wants_before_copy` is True for a pass receives in
``before_pass`` a private copy of the graph taken before the pass (it may keep it; it must not mutate
it); the others receive the live graph, which they must neither keep nor mutate.

Environment (read by :func:`instruments_from_env`, which the manager applies automatically):
``QCOMPILE_DUMP_DIR=dir`` -> :class:`DumpIR`, ``QCOMPILE_CHECK_EQUIVALENCE=1`` ->
:class:`EquivalenceCheck`, ``QCOMPILE_STOP_AFTER=pass`` -> :class:`StopAfter`,
``QCOMPILE_TIMING=1`` -> :class:`Timing` (table printed to stderr).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qcompile.ir import QGraph
from qcompile.pass_base import Pass, PassContext, PassResult

if TYPE_CHECKING:
    from qcompile.pass_manager import PipelineResult

__all__ = [
    "DumpIR",
    "EquivalenceCheck",
    "Instrument",
    "StopAfter",
    "Timing",
    "instruments_from_env",
]


from qcompile.equivalence_check import (  # noqa: E402,F401
    DEFAULT_TOLERANCE,
    TRANSFORMED_NODES,
    EquivalenceCheck,
    EquivalenceRecord,
    NodeDivergence,
    localize_divergence,
    relative_error,
)
from qcompile.instrument_base import Instrument  # noqa: E402

_DUMP_FILE = re.compile(r"^\d{2,}_[\w.+-]*\.(txt|constants\.txt|report\.json|error\.txt)$")


def format_constants(qgraph: QGraph) -> str:
    """One line per constant: target, dtype/shape, abs-max and a short content hash. The IR text does
    not show values, so this is where a diff reveals what an equivalence pass did to the weights."""
    lines, seen = [], set()
    for node in qgraph.graph.nodes:
        if node.op != "get_attr" or node.target in seen:
            continue
        seen.add(node.target)
        t = qgraph.get_constant(node).detach().to("cpu").contiguous()
        digest = hashlib.sha1(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()[:10] if t.numel() else "-"
        absmax = (
            f"{float(t.abs().max()):.6g}" if t.numel() and (t.is_floating_point() or t.is_complex()) else "-"
        )
        shape = "x".join(str(d) for d in t.shape)
        lines.append(
            f"{node.target}  {str(t.dtype).replace('torch.', '')}[{shape}]  absmax={absmax}  sha1={digest}"
        )
    return "\n".join(lines) + "\n"


def _jsonable_options(pass_: Pass) -> Any:
    options = getattr(pass_, "options", None)
    return asdict(options) if is_dataclass(options) and not isinstance(options, type) else options


class DumpIR(Instrument):
    """Write the IR before the pipeline and after every pass as numbered, diffable text files.

    ``00_input.txt``, ``01_<pass>.txt``, ``02_<pass>.txt``, ... (``qgraph.print_readable()``), and
    next to each ``NN_<pass>.report.json`` (kind, changed, summary, options, report) and, with
    ``constants=True``, ``NN_<pass>.constants.txt`` (:func:`format_constants`: weight changes do not
    show in the IR text). Files of an earlier dump in the same directory are removed first.
    ``diff 01_smooth.txt 02_rotate.txt`` shows what ``rotate`` did. A failing pass leaves
    ``NN_<pass>.error.txt`` with the error and the graph as far as it got.
    """

    def __init__(self, directory: str | os.PathLike[str], *, constants: bool = True) -> None:
        self.directory = Path(directory)
        self.constants = constants
        self.index = 0
        self.written: list[Path] = []

    def before_pipeline(self, qgraph: QGraph, ctx: PassContext) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.iterdir():
            if stale.is_file() and _DUMP_FILE.match(stale.name):
                stale.unlink()
        self.index = 0
        self.written = []
        self._write_graph("00_input", qgraph)

    def before_pass(self, pass_: Pass, qgraph: QGraph, ctx: PassContext) -> None:
        self.index += 1

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        stem = f"{self.index:02d}_{pass_.name}"
        self._write_graph(stem, result.qgraph)
        report = {
            "pass": pass_.name,
            "kind": pass_.kind,
            "changed": result.changed,
            "summary": result.summary,
            "options": _jsonable_options(pass_),
            "report": result.report,
        }
        self._write(f"{stem}.report.json", json.dumps(report, indent=2, default=str) + "\n")

    def on_error(self, pass_: Pass, error: BaseException, qgraph: QGraph, ctx: PassContext) -> None:
        text = f"# {type(error).__name__}: {error}\n\n{qgraph.print_readable()}"
        self._write(f"{self.index:02d}_{pass_.name}.error.txt", text)

    def _write_graph(self, stem: str, qgraph: QGraph) -> None:
        self._write(f"{stem}.txt", qgraph.print_readable())
        if self.constants:
            self._write(f"{stem}.constants.txt", format_constants(qgraph))

    def _write(self, name: str, text: str) -> None:
        path = self.directory / name
        path.write_text(text, encoding="utf-8")
        self.written.append(path)

    def __repr__(self) -> str:
        return f"DumpIR({str(self.directory)!r})"


# ---- timing ------------------------------------------------------------------------------------


@dataclass
class PassTime:
    name: str
    seconds: float


class Timing(Instrument):
    """Wall time of every pass (and the pipeline), rendered by :meth:`table`.

    It times the window between its own ``before_pass`` and ``after_pass``; hooks nest, so put it
    last in the instrument list to time the pass alone (``instruments_from_env`` does).
    """

    def __init__(self, *, echo: bool = False) -> None:
        self.echo = echo  # print the table to stderr at the end of the pipeline
        self.passes: list[PassTime] = []
        self.total_seconds = 0.0
        self._pipeline_start = 0.0
        self._pass_start = 0.0

    def before_pipeline(self, qgraph: QGraph, ctx: PassContext) -> None:
        self.passes = []
        self._pipeline_start = time.perf_counter()

    def before_pass(self, pass_: Pass, qgraph: QGraph, ctx: PassContext) -> None:
        self._pass_start = time.perf_counter()

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        self.passes.append(PassTime(pass_.name, time.perf_counter() - self._pass_start))

    def after_pipeline(self, result: PipelineResult, ctx: PassContext) -> None:
        self.total_seconds = time.perf_counter() - self._pipeline_start
        if self.echo:
            print(self.table(), file=sys.stderr)

    def table(self) -> str:
        """Text table: pass, seconds, share of the pipeline."""
        total = self.total_seconds or sum(p.seconds for p in self.passes)
        width = max([len("pass"), len("total")] + [len(p.name) for p in self.passes])
        lines = [f"{'#':>3}  {'pass':<{width}}  {'seconds':>10}  {'%':>6}"]
        for i, p in enumerate(self.passes, start=1):
            share = 100.0 * p.seconds / total if total else 0.0
            lines.append(f"{i:>3}  {p.name:<{width}}  {p.seconds:>10.4f}  {share:>6.1f}")
        lines.append(f"{'':>3}  {'total':<{width}}  {total:>10.4f}  {100.0 if total else 0.0:>6.1f}")
        return "\n".join(lines)


# ---- stop after --------------------------------------------------------------------------------


@dataclass
class StopAfter(Instrument):
    """End the pipeline after the pass named ``pass_name`` (its result says it stopped early)."""

    pass_name: str
    seen: list[str] = field(default_factory=list, repr=False)
    stopped: bool = field(default=False, repr=False)

    def before_pipeline(self, qgraph: QGraph, ctx: PassContext) -> None:
        self.seen, self.stopped = [], False

    def wants_stop(self, pass_: Pass, result: PassResult, ctx: PassContext) -> bool:
        self.seen.append(pass_.name)
        self.stopped = pass_.name == self.pass_name
        return self.stopped

    def after_pipeline(self, result: PipelineResult, ctx: PassContext) -> None:
        if not self.stopped:
            warnings.warn(
                f"StopAfter({self.pass_name!r}): no pass of that name ran; passes were: {', '.join(self.seen)}",
                stacklevel=2,
            )


# ---- environment -------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}


def instruments_from_env(env: Mapping[str, str] | None = None) -> list[Instrument]:
    """Instruments requested by ``QCOMPILE_*`` variables, ordered so that hooks nest sensibly:
    DumpIR outermost (its report sees the equivalence numbers), Timing innermost."""
    env = os.environ if env is None else env
    found: list[Instrument] = []
    if env.get("QCOMPILE_DUMP_DIR"):
        found.append(DumpIR(env["QCOMPILE_DUMP_DIR"]))
    if env.get("QCOMPILE_CHECK_EQUIVALENCE", "").strip().lower() in _TRUE:
        found.append(EquivalenceCheck())
    if env.get("QCOMPILE_STOP_AFTER"):
        found.append(StopAfter(env["QCOMPILE_STOP_AFTER"].strip()))
    if env.get("QCOMPILE_TIMING", "").strip().lower() in _TRUE:
        found.append(Timing(echo=True))
    return found
