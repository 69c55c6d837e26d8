"""The instrument protocol (hooks the pass manager calls); see :mod:`qcompile.instruments`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcompile.ir import QGraph
from qcompile.pass_base import Pass, PassContext, PassResult

if TYPE_CHECKING:
    from qcompile.pass_manager import PipelineResult


class Instrument:
    """Base class: every hook is a no-op, so an instrument overrides only what it observes."""

    # True: ``before_pass`` gets a private copy of the graph as it was before the pass.
    needs_before_copy: bool = False

    def wants_before_copy(self, pass_: Pass) -> bool:
        """Per-pass refinement of ``needs_before_copy`` (copies of an LLM graph are not free)."""
        return self.needs_before_copy

    def before_pipeline(self, qgraph: QGraph, ctx: PassContext) -> None:
        pass

    def before_pass(self, pass_: Pass, qgraph: QGraph, ctx: PassContext) -> None:
        pass

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        pass

    def wants_stop(self, pass_: Pass, result: PassResult, ctx: PassContext) -> bool:
        return False

    def after_pipeline(self, result: PipelineResult, ctx: PassContext) -> None:
        pass

    def on_error(self, pass_: Pass, error: BaseException, qgraph: QGraph, ctx: PassContext) -> None:
        """A pass or an instrument check failed; ``qgraph`` is the graph as far as it got."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---- IR dump -----------------------------------------------------------------------------------

# Files a previous DumpIR run left: removed so the directory always shows exactly one pipeline.
