"""``Timing``: the wall time of every pass and of the pipeline (after MLIR's ``--mlir-timing``)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from qcompile.pipeline.contract import Pass, PassContext, PassResult, PipelineResult
from qcompile.pipeline.instruments.base import Instrument


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

    def before_pipeline(self, ir: Any, ctx: PassContext) -> None:
        self.passes = []
        self._pipeline_start = time.perf_counter()

    def before_pass(self, pass_: Pass, ir: Any, ctx: PassContext) -> None:
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
