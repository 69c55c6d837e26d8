"""``DisablePasses``: keep named passes from running (the general way to turn one rewrite off)."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable

from qcompile.pipeline.contract import Pass, PassContext, PipelineResult
from qcompile.pipeline.instruments.base import Instrument

_PATTERN_CHARS = "*?["


def is_pattern(name: str) -> bool:
    return any(c in name for c in _PATTERN_CHARS)


class DisablePasses(Instrument):
    """The passes named in ``names`` do not run; the pipeline result lists them under ``disabled``.

    Any pass can be disabled by its exact name, lowering and backend passes included
    (``onnx.fuse_rotary``); a later pass that needed what a disabled one would have established
    refuses with its own precondition error. A name with ``*``, ``?`` or ``[`` is a pattern
    (``fnmatch``) that matches **equivalence passes only** — the optional rewrites, which change how
    a model computes but not what — so ``onnx.*`` turns off every ONNX rewrite and leaves
    ``onnx.export`` and ``onnx.verify`` alone. A name or pattern that matches no pass of the pipeline
    is reported with a warning at the end.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = [n.strip() for n in names if n.strip()]
        self.hit: set[str] = set()

    def matches(self, pass_: Pass) -> list[str]:
        """The names / patterns of this instrument that disable ``pass_``."""
        exact = [n for n in self.names if n == pass_.name]
        if exact or pass_.kind != "equivalence":
            return exact
        return [n for n in self.names if is_pattern(n) and fnmatch.fnmatchcase(pass_.name, n)]

    def before_pipeline(self, ir, ctx: PassContext) -> None:
        self.hit = set()

    def wants_skip(self, pass_: Pass, ctx: PassContext) -> bool:
        found = self.matches(pass_)
        self.hit.update(found)
        return bool(found)

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
