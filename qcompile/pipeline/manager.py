"""The pass manager: runs an ordered list of passes on an IR and lets instruments observe it.

It never mutates its input: :meth:`PassManager.run` works on ``ir.copy()``, so the caller can compare
the float graph with the result, or run another recipe on the same capture. Per pass it asks the
instruments whether to skip it (:class:`~qcompile.pipeline.instruments.DisablePasses`), checks the
pass's required facts on the real IR (before the pass touches it), runs the pass, checks the facts
the pass ensures, records its :class:`PassResult`, and calls the instrument hooks (see
:mod:`qcompile.pipeline.instruments.base` for their order). Any exception inside a pass becomes a
:class:`PassError` naming the pass, with the original as ``__cause__``.

Instruments requested through the environment (``QCOMPILE_DUMP_DIR``, ``QCOMPILE_TIMING``,
``QCOMPILE_STOP_AFTER``, ``QCOMPILE_DISABLE_PASSES``, ``QCOMPILE_CHECK_EQUIVALENCE``,
``QCOMPILE_VERIFY_IR``) are added automatically after the explicit ones, unless an instrument of the
same type was given explicitly or ``use_env=False``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, PipelineResult
from qcompile.pipeline.instruments import Instrument, instruments_from_env
from qcompile.pipeline.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

RecipeLike = str | Path | Mapping[str, Any] | Recipe

__all__ = ["PassManager", "PipelineResult", "RecipeLike", "run_recipe"]


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

    def run(self, ir: Any, ctx: PassContext | None = None) -> PipelineResult:
        """Run the pipeline on a copy of ``ir`` and return the result (``ir`` is untouched)."""
        ctx = ctx if ctx is not None else PassContext()
        work = ir.copy()
        start = time.perf_counter()
        for inst in self.instruments:
            inst.before_pipeline(work, ctx)
        results: list[tuple[str, PassResult]] = []
        disabled: list[str] = []
        stopped_after: str | None = None
        skipped: list[str] = []
        for index, pass_ in enumerate(self.passes):
            if any([inst.wants_skip(pass_, ctx) for inst in self.instruments]):
                disabled.append(pass_.name)
                log.info("pass %s disabled", pass_.name)
                continue
            result = self._run_pass(pass_, work, ctx)
            work = result.ir
            results.append((pass_.name, result))
            # Ask every instrument (no short-circuit: each may track what it saw).
            if any([inst.wants_stop(pass_, result, ctx) for inst in self.instruments]):
                stopped_after = pass_.name
                skipped = [p.name for p in self.passes[index + 1 :]]
                log.info("pipeline stopped after %s; not run: %s", pass_.name, ", ".join(skipped) or "-")
                break
        pipeline = PipelineResult(
            work, results, time.perf_counter() - start, stopped_after, skipped, disabled
        )
        for inst in self.instruments:
            inst.after_pipeline(pipeline, ctx)
        return pipeline

    def _run_pass(self, pass_: Pass, ir: Any, ctx: PassContext) -> PassResult:
        copies = any(i.wants_before_copy(pass_) for i in self.instruments)
        snapshot = ir.copy() if copies else None
        for inst in self.instruments:
            inst.before_pass(pass_, snapshot if inst.wants_before_copy(pass_) else ir, ctx)
        current = ir
        try:
            pass_.check_requires(ir, ctx)
            t0 = time.perf_counter()
            result = _call_pass(pass_, ir, ctx)
            log.debug("pass %s: %.3f s, changed=%s", pass_.name, time.perf_counter() - t0, result.changed)
            current = result.ir
            pass_.check_ensures(current, ctx)
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


def _call_pass(pass_: Pass, ir: Any, ctx: PassContext) -> PassResult:
    """``pass_.run`` with errors named after the pass and the result's shape checked."""
    try:
        result = pass_.run(ir, ctx)
    except PassError as exc:
        if exc.pass_name == pass_.name:
            raise
        raise PassError(pass_.name, str(exc), node=exc.node) from exc
    except Exception as exc:
        raise PassError(pass_.name, f"failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, PassResult) or result.ir is None:
        raise PassError(pass_.name, f"run() must return a PassResult holding the IR, got {result!r}")
    return result


def run_recipe(
    ir: Any,
    recipe: RecipeLike,
    ctx: PassContext | None = None,
    instruments: Iterable[Instrument] | None = None,
) -> PipelineResult:
    """``PassManager.from_recipe(recipe, instruments).run(ir, ctx)``: the one-call entry point."""
    return PassManager.from_recipe(recipe, instruments).run(ir, ctx)
