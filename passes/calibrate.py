"""``calibrate``: run the graph on the context's calibration batches and record every linear's input
statistics (analysis: changes no numbers). See :mod:`qcompile.quant.calibration` for what is kept and why.

Writes ``ctx.state[keys.STATE_CALIBRATION]`` (node name -> :class:`~qcompile.quant.calibration.LinearInputStats`) and
``node.meta["qcompile"]["act_stats"]`` on each linear (the same objects).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from qcompile.ir import QGraph, keys
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass
from qcompile.quant.calibration import CalibrationError, calibrate, total_nbytes


def _peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


@register_pass
class CalibratePass(Pass):
    """Observe per-channel / per-token abs-max, a row sample and (optionally) XᵀX at every linear input."""

    name: ClassVar[str] = "calibrate"
    kind = "analysis"
    uses_calibration = True
    requires = (facts.STRUCTURE,)
    ensures = (facts.CALIBRATION,)

    @dataclass
    class Options:
        hessian: bool = False  # also accumulate XᵀX (float64, [in, in] per linear) for GPTQ
        sample_rows: int = 256  # input rows kept per linear (seeded reservoir) for error measurements

        def __post_init__(self) -> None:
            if self.sample_rows < 0:
                raise ValueError("sample_rows must be >= 0")

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        opts = self.options
        batches = ctx.calibration
        if batches is None:
            raise PassError(
                self.name,
                "no calibration data; pass calibration=... to qcompile.quantize or give the context batches",
            )
        batches = list(batches)
        if not batches:
            raise PassError(self.name, "the calibration data is empty (0 batches); give at least one batch")
        rss_before = _peak_rss_bytes()
        cuda = torch.cuda.is_available() and str(ctx.device).startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            cuda_before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        try:
            stats = calibrate(
                qgraph,
                batches,
                hessian=opts.hessian,
                sample_rows=opts.sample_rows,
                seed=ctx.seed,
                progress=ctx.show_progress,
            )
        except CalibrationError as exc:
            raise PassError(self.name, str(exc).removeprefix("calibrate: ")) from exc
        seconds = time.perf_counter() - start
        ctx.state[keys.STATE_CALIBRATION] = stats
        n_tokens = next(iter(stats.values())).n_tokens if stats else 0
        report = {
            "batches": len(batches),
            "tokens": n_tokens,
            "linears": len(stats),
            "hessian": opts.hessian,
            "sample_rows": opts.sample_rows,
            "seconds": round(seconds, 3),
            "stats_mib": round(total_nbytes(stats) / 2**20, 3),
            # Growth of the process's peak RSS during calibration: a lower bound on the extra memory
            # it needed (0 when an earlier phase, e.g. capture, had already peaked higher).
            "peak_rss_growth_mib": round(max(0, _peak_rss_bytes() - rss_before) / 2**20, 1),
        }
        if cuda:
            report["peak_cuda_extra_mib"] = round(
                (torch.cuda.max_memory_allocated() - cuda_before) / 2**20, 1
            )
        summary = (
            f"calibrated {len(stats)} linears on {len(batches)} batches ({n_tokens} tokens) in {seconds:.2f}s; "
            f"stats {report['stats_mib']} MiB{' incl. XᵀX' if opts.hessian else ''}"
        )
        return PassResult(qgraph, changed=False, report=report, summary=summary)
