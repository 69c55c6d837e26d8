"""The instrument protocol: hooks the pass manager calls (see :mod:`qcompile.pipeline.instruments`).

Instruments observe; they never change what a pass does. The manager calls, for every instrument::

    before_pipeline(ir, ctx)
    for each pass:
        wants_skip(pass_, ctx)               # any True: the pass does not run (DisablePasses)
        before_pass(pass_, ir, ctx)          # in list order
        ... the pass runs ...
        after_pass(pass_, result, ctx)       # in reverse list order (hooks nest like context managers)
        wants_stop(pass_, result, ctx)       # any True ends the pipeline after this pass
    after_pipeline(pipeline_result, ctx)
    on_error(pass_, error, ir, ctx)          # instead of the rest, when a pass or a check fails

An instrument whose :meth:`Instrument.wants_before_copy` is True for a pass receives in
``before_pass`` a private copy of the IR taken before the pass (it may keep it; it must not mutate
it); the others receive the live IR, which they must neither keep nor mutate.
"""

from __future__ import annotations

from typing import Any

from qcompile.pipeline.contract import Pass, PassContext, PassResult, PipelineResult


class Instrument:
    """Base class: every hook is a no-op, so an instrument overrides only what it observes."""

    # True: ``before_pass`` gets a private copy of the IR as it was before the pass.
    needs_before_copy: bool = False

    def wants_before_copy(self, pass_: Pass) -> bool:
        """Per-pass refinement of ``needs_before_copy`` (copies of an LLM graph are not free)."""
        return self.needs_before_copy

    def before_pipeline(self, ir: Any, ctx: PassContext) -> None:
        pass

    def wants_skip(self, pass_: Pass, ctx: PassContext) -> bool:
        return False

    def before_pass(self, pass_: Pass, ir: Any, ctx: PassContext) -> None:
        pass

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        pass

    def wants_stop(self, pass_: Pass, result: PassResult, ctx: PassContext) -> bool:
        return False

    def after_pipeline(self, result: PipelineResult, ctx: PassContext) -> None:
        pass

    def on_error(self, pass_: Pass, error: BaseException, ir: Any, ctx: PassContext) -> None:
        """A pass or an instrument check failed; ``ir`` is the IR as far as it got."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
