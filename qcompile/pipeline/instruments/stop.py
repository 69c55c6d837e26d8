"""``StopAfter``: end the pipeline after a named pass."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from qcompile.pipeline.contract import Pass, PassContext, PassResult, PipelineResult
from qcompile.pipeline.instruments.base import Instrument


@dataclass
class StopAfter(Instrument):
    """End the pipeline after the pass named ``pass_name`` (its result says it stopped early)."""

    pass_name: str
    seen: list[str] = field(default_factory=list, repr=False)
    stopped: bool = field(default=False, repr=False)

    def before_pipeline(self, ir: Any, ctx: PassContext) -> None:
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
