"""Instruments requested through ``QCOMPILE_*`` environment variables (the pass manager adds them)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from qcompile.pipeline.instruments.base import Instrument
from qcompile.pipeline.instruments.disable import DisablePasses
from qcompile.pipeline.instruments.dump import DumpIR
from qcompile.pipeline.instruments.equivalence import EquivalenceCheck
from qcompile.pipeline.instruments.stop import StopAfter
from qcompile.pipeline.instruments.timing import Timing
from qcompile.pipeline.instruments.verify import VerifyIR

_TRUE = {"1", "true", "yes", "on"}

# variable -> what it turns on (for the README and `qcompile --help`)
ENV_VARIABLES = {
    "QCOMPILE_DUMP_DIR": "dump the IR before the pipeline and after every pass into this directory",
    "QCOMPILE_CHECK_EQUIVALENCE": "1: check float outputs before/after every equivalence pass",
    "QCOMPILE_STOP_AFTER": "end the pipeline after the pass of this name",
    "QCOMPILE_DISABLE_PASSES": "comma-separated pass names that do not run",
    "QCOMPILE_TIMING": "1: print the time of every pass",
    "QCOMPILE_VERIFY_IR": "1: check the IR after every pass (meta, constants, structure)",
}


def instruments_from_env(env: Mapping[str, str] | None = None) -> list[Instrument]:
    """Instruments requested by ``QCOMPILE_*`` variables, ordered so that hooks nest sensibly:
    DumpIR outermost (its report sees the equivalence numbers), Timing innermost."""
    env = os.environ if env is None else env
    found: list[Instrument] = []
    if env.get("QCOMPILE_DISABLE_PASSES", "").strip():
        found.append(DisablePasses(env["QCOMPILE_DISABLE_PASSES"].split(",")))
    if env.get("QCOMPILE_DUMP_DIR"):
        found.append(DumpIR(env["QCOMPILE_DUMP_DIR"]))
    if env.get("QCOMPILE_VERIFY_IR", "").strip().lower() in _TRUE:
        found.append(VerifyIR())
    if env.get("QCOMPILE_CHECK_EQUIVALENCE", "").strip().lower() in _TRUE:
        found.append(EquivalenceCheck())
    if env.get("QCOMPILE_STOP_AFTER"):
        found.append(StopAfter(env["QCOMPILE_STOP_AFTER"].strip()))
    if env.get("QCOMPILE_TIMING", "").strip().lower() in _TRUE:
        found.append(Timing(echo=True))
    return found
