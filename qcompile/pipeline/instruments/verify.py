"""``VerifyIR``: check the IR after every pass with :func:`qcompile.ir.verify.verify` and fail the
pipeline, naming the pass, at the first one that leaves it malformed."""

from __future__ import annotations

from typing import Any

from qcompile.ir import QGraph
from qcompile.ir.verify import verify
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult
from qcompile.pipeline.instruments.base import Instrument


class VerifyIR(Instrument):
    """After every pass whose result is a QGraph: ``meta["val"]`` on every value, every constant
    alive, the structural analysis naming live nodes, only documented annotation keys. Other IRs are
    checked by their own ``verify()`` method when they have one."""

    def before_pipeline(self, ir: Any, ctx: PassContext) -> None:
        self._check("the pipeline's input", ir)

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        self._check(pass_.name, result.ir)

    def _check(self, where: str, ir: Any) -> None:
        if isinstance(ir, QGraph):
            problems = verify(ir)
        elif hasattr(ir, "verify"):
            problems = ir.verify()
        else:
            return
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise PassError(where, "left a malformed IR: " + "; ".join(problems[:5]) + more)
