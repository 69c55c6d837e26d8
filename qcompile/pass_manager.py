"""The pass manager: runs an ordered list of passes on a QGraph and lets instruments observe it.

It never mutates its input: :meth:`PassManager.run` works on ``qgraph.copy()``, so the caller can
compare the float graph with the result, or run another recipe on the same capture. Per pass it
checks ``requires`` (as code, before the pass touches the graph), runs the pass, records its
:class:`PassResult`, appends its name to ``ctx.completed``, and calls the instrument hooks (see
:mod:`qcompile.instruments` for their order). Any exception inside a pass becomes a
:class:`PassError` naming the pass, with the original as ``__cause__``.

Instruments requested through the environment (``QCOMPILE_DUMP_DIR``, ``QCOMPILE_TIMING``,
``QCOMPILE_STOP_AFTER``, ``QCOMPILE_CHECK_EQUIVALENCE``) are added automatically after the explicit
ones, unless an instrument of the same type was given explicitly or ``use_env=False``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompile.instruments import Instrument, instruments_from_env
from qcompile.ir import QGraph
from qcompile.pass_base import Pass, PassContext, PassError, PassResult
from qcompile.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

RecipeLike = str | Path | Mapping[str, Any] | Recipe


@dataclass
class PipelineResult:
    """The outcome of a pipeline: the final graph and every pass's result, in order."""

    qgraph: QGraph
    results: list[tuple[str, PassResult]]
    total_seconds: float
    # The pass after which an instrument (e.g. StopAfter) ended the pipeline, and what did not run.
    stopped_after: str | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def stopped_early(self) -> bool:
        return self.stopped_after is not None and bool(self.skipped)

    @property
    def changed(self) -> bool:
        return any(r.changed for _, r in self.results)

    def result(self, pass_name: str) -> PassResult:
        """The result of the last run of ``pass_name``."""
        for name, res in reversed(self.results):
            if name == pass_name:
                return res
        raise KeyError(f"no pass {pass_name!r} ran; ran: {', '.join(n for n, _ in self.results)}")

    def summary(self) -> str:
        """One line per pass: name, changed or not, the pass's own summary."""
        lines = [
            f"{name:<20} {'changed' if r.changed else 'unchanged':<9}  {r.summary}"
            for name, r in self.results
        ]
        if self.stopped_early:
            lines.append(f"stopped after {self.stopped_after}; not run: {', '.join(self.skipped)}")
        lines.append(f"total {self.total_seconds:.3f} s")
        return "\n".join(lines)


class PassManager:
    """Runs ``passes`` in order with ``instruments`` observing (see the module docstring)."""

    def __init__(
        self, passes: Sequence[Pass], instruments: Iterable[Instrument] = (), *, use_env: bool = True
    ) -> None:
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"PassManager: expected Pass objects, got {type(p).__name__} ({p!r})")
        self.instruments = list(instruments)
        if use_env:
            given = {type(i) for i in self.instruments}
            self.instruments += [i for i in instruments_from_env() if type(i) not in given]

    @classmethod
    def from_recipe(
        cls, recipe: RecipeLike, instruments: Iterable[Instrument] | None = None, *, use_env: bool = True
    ) -> PassManager:
        """A manager for a recipe (a :class:`Recipe`, a shipped name, a TOML path or a dict)."""
        return cls(load_recipe(recipe).build_passes(), instruments or (), use_env=use_env)

    def run(self, qgraph: QGraph, ctx: PassContext | None = None) -> PipelineResult:
        """Run the pipeline on a copy of ``qgraph`` and return the result (``qgraph`` is untouched)."""
        ctx = ctx if ctx is not None else PassContext()
        # Passes may read their neighbours' options (e.g. smooth searches α under the quantize pass's
        # own quantizers): the pipeline is configuration, so it travels in the context.
        ctx.state["pipeline_passes"] = list(self.passes)
        work = qgraph.copy()
        start = time.perf_counter()
        for inst in self.instruments:
            inst.before_pipeline(work, ctx)
        results: list[tuple[str, PassResult]] = []
        stopped_after: str | None = None
        for index, pass_ in enumerate(self.passes):
            result = self._run_pass(pass_, work, ctx)
            work = result.qgraph
            results.append((pass_.name, result))
            # Ask every instrument (no short-circuit: each may track what it saw).
            if any([inst.wants_stop(pass_, result, ctx) for inst in self.instruments]):
                stopped_after = pass_.name
                skipped = [p.name for p in self.passes[index + 1 :]]
                log.info("pipeline stopped after %s; not run: %s", pass_.name, ", ".join(skipped) or "-")
                break
        else:
            skipped = []
        pipeline = PipelineResult(work, results, time.perf_counter() - start, stopped_after, skipped)
        for inst in self.instruments:
            inst.after_pipeline(pipeline, ctx)
        return pipeline

    def _run_pass(self, pass_: Pass, qgraph: QGraph, ctx: PassContext) -> PassResult:
        snapshot = qgraph.copy() if any(i.wants_before_copy(pass_) for i in self.instruments) else None
        for inst in self.instruments:
            inst.before_pass(pass_, snapshot if inst.wants_before_copy(pass_) else qgraph, ctx)
        current = qgraph
        try:
            pass_.check_requires(qgraph, ctx)
            t0 = time.perf_counter()
            result = _call_pass(pass_, qgraph, ctx)
            log.debug("pass %s: %.3f s, changed=%s", pass_.name, time.perf_counter() - t0, result.changed)
            current = result.qgraph
            ctx.completed.append(pass_.name)
            for inst in reversed(self.instruments):
                inst.after_pass(pass_, result, ctx)
        except Exception as exc:
            for inst in self.instruments:
                inst.on_error(pass_, exc, current, ctx)
            raise
        return result

    def __repr__(self) -> str:
        names = " -> ".join(p.name for p in self.passes)
        return f"PassManager({names}; instruments={self.instruments})"


def _call_pass(pass_: Pass, qgraph: QGraph, ctx: PassContext) -> PassResult:
    """``pass_.run`` with errors named after the pass and the result's shape checked."""
    try:
        result = pass_.run(qgraph, ctx)
    except PassError as exc:
        if exc.pass_name == pass_.name:
            raise
        raise PassError(pass_.name, str(exc), node=exc.node) from exc
    except Exception as exc:
        raise PassError(pass_.name, f"failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, PassResult) or not isinstance(result.qgraph, QGraph):
        raise PassError(pass_.name, f"run() must return a PassResult holding a QGraph, got {result!r}")
    return result


def run_recipe(
    qgraph: QGraph,
    recipe: RecipeLike,
    ctx: PassContext | None = None,
    instruments: Iterable[Instrument] | None = None,
) -> PipelineResult:
    """``PassManager.from_recipe(recipe, instruments).run(qgraph, ctx)``: the one-call entry point."""
    return PassManager.from_recipe(recipe, instruments).run(qgraph, ctx)
