"""Instruments: pass-level debugging as plug-ins of the pass manager (after TVM's ``PassInstrument``
and MLIR's ``--mlir-print-ir-after-all`` / ``--mlir-timing``), never flags threaded through passes.
The hook protocol is :class:`~qcompile.pipeline.instruments.base.Instrument`.

| instrument | what it does | environment |
|---|---|---|
| :class:`DumpIR` | the IR before the pipeline and after every pass, numbered text + JSON report | ``QCOMPILE_DUMP_DIR=dir`` |
| :class:`Timing` | wall time per pass | ``QCOMPILE_TIMING=1`` |
| :class:`StopAfter` | end the pipeline after a named pass | ``QCOMPILE_STOP_AFTER=name`` |
| :class:`DisablePasses` | named passes do not run | ``QCOMPILE_DISABLE_PASSES=a,b`` |
| :class:`EquivalenceCheck` | float outputs before/after each equivalence pass, first diverging node | ``QCOMPILE_CHECK_EQUIVALENCE=1`` |
| :class:`VerifyIR` | the IR is well formed after every pass | ``QCOMPILE_VERIFY_IR=1`` |

:func:`instruments_from_env` reads the variables; the pass manager applies it automatically.
"""

from qcompile.pipeline.instruments.base import Instrument
from qcompile.pipeline.instruments.disable import DisablePasses
from qcompile.pipeline.instruments.dump import DumpIR, format_constants
from qcompile.pipeline.instruments.env import ENV_VARIABLES, instruments_from_env
from qcompile.pipeline.instruments.equivalence import (
    DEFAULT_TOLERANCE,
    TRANSFORMED_NODES,
    EquivalenceCheck,
    EquivalenceRecord,
    NodeDivergence,
    localize_divergence,
    relative_error,
)
from qcompile.pipeline.instruments.stop import StopAfter
from qcompile.pipeline.instruments.timing import PassTime, Timing
from qcompile.pipeline.instruments.verify import VerifyIR

__all__ = [
    "DEFAULT_TOLERANCE",
    "ENV_VARIABLES",
    "TRANSFORMED_NODES",
    "DisablePasses",
    "DumpIR",
    "EquivalenceCheck",
    "EquivalenceRecord",
    "Instrument",
    "NodeDivergence",
    "PassTime",
    "StopAfter",
    "Timing",
    "VerifyIR",
    "format_constants",
    "instruments_from_env",
    "localize_divergence",
    "relative_error",
]
