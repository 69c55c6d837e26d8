"""``DisablePasses``: keep named passes from running (the general way to turn one rewrite off)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from qcompile.pipeline.contract import Pass, PassContext, PipelineResult
from qcompile.pipeline.instruments.base import Instrument


class DisablePasses(Instrument):
    """The passes named in ``names`` do not run; the pipeline result lists them under ``disabled``.

    Any pass can be disabled, lowering and backend passes included (``onnx.fuse_rotary``); a later
    pass that needed what a disabled one would have established refuses with its own precondition
    error. A name that matches no pass of the pipeline is reported with a warning at the end.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = [n.strip() for n in names if n.strip()]
        self.hit: set[str] = set()

    def before_pipeline(self, ir, ctx: PassContext) -> None:
        self.hit = set()

    def wants_skip(self, pass_: Pass, ctx: PassContext) -> bool:
        if pass_.name in self.names:
            self.hit.add(pass_.name)
            return True
        return False

    def after_pipeline(self, result: PipelineResult, ctx: PassContext) -> None:
        unused = [n for n in self.names if n not in self.hit]
        if unused:
            ran = ", ".join(name for name, _ in result.results)
            warnings.warn(
                f"DisablePasses: no pass named {', '.join(unused)} in this pipeline; passes were: {ran}",
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return f"DisablePasses({self.names!r})"
