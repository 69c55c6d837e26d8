"""What the ``quantize`` pass reports: one row per linear and per KV-cache entry, the structured
report (counts per scheme, SQNR statistics, what was left float) and its printed summary."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class LinearQuantReport:
    """What happened to one linear: its scheme and the error it now makes."""

    node: str
    role: str
    layer: int | None
    scheme: str
    weight_sqnr_db: float  # W vs Ŵ
    output_sqnr_db: float | None = None  # X Wᵀ vs X̂ Ŵᵀ on calibration samples, when there are any
    mean_clip_ratio: float | None = None  # clip search only
    method: str = "rtn"  # weight quantizer: rtn | gptq


@dataclass
class CacheQuantReport:
    """One quantized KV-cache entry and the error it now carries (on the calibration sample rows)."""

    layer: int | None
    attention: str  # the sdpa node
    entry: str  # key | value
    node: str
    scheme: str
    sqnr_db: float | None
    clipped: float | None  # fraction of sampled values at the grid's limit


def _stats(values: list[float]) -> dict[str, float] | None:
    finite = [v for v in values if v is not None]
    if not finite:
        return None
    return {"min": min(finite), "median": statistics.median(finite)}


def build_report(
    rows: list[LinearQuantReport],
    left: list[dict[str, Any]],
    embeddings: list[dict[str, Any]],
    caches: list[CacheQuantReport],
) -> dict[str, Any]:
    return {
        # linears per scheme and method, e.g. {"w4g128a+clip-a16 gptq": 208, "w8g128a+clip-a16 gptq": 2}
        "schemes": dict(Counter(f"{r.scheme} {r.method}" for r in rows)),
        "quantized": len(rows),
        "left_float": left,
        "weight_sqnr_db": _stats([r.weight_sqnr_db for r in rows]),
        "output_sqnr_db": _stats([r.output_sqnr_db for r in rows if r.output_sqnr_db is not None]),
        "linears": [asdict(r) for r in rows],
        "embedding": embeddings,
        "kv_cache": {
            "entries": [asdict(r) for r in caches],
            "sqnr_db_median": _stats([r.sqnr_db for r in caches]),
        }
        if caches
        else None,
    }


def _fmt_db(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def render_summary(report: dict[str, Any], rows: list[LinearQuantReport], worst: int = 5) -> str:
    w, o = report["weight_sqnr_db"], report["output_sqnr_db"]
    schemes = ", ".join(f"{name} ×{n}" for name, n in report["schemes"].items()) or "none"
    left = ", ".join(f"{e['node']} ({e['reason']})" for e in report["left_float"]) or "none"
    lines = [f"{report['quantized']} linears quantized: {schemes}; left float: {left}"]
    if w:
        lines.append(f"  weight SQNR min {_fmt_db(w['min'])} dB, median {_fmt_db(w['median'])} dB")
    if o:
        lines.append(
            f"  output SQNR min {_fmt_db(o['min'])} dB, median {_fmt_db(o['median'])} dB (calibration samples)"
        )
    key = (lambda r: r.output_sqnr_db) if o else (lambda r: r.weight_sqnr_db)
    ranked = sorted(rows, key=key)[:worst]
    if ranked:
        lines.append(
            f"  worst {len(ranked)}:  {'node':<14} {'role':<7} {'layer':>5} {'weight dB':>10} {'output dB':>10}"
        )
        for r in ranked:
            layer = "-" if r.layer is None else str(r.layer)
            lines.append(
                f"            {r.node:<14} {r.role:<7} {layer:>5} {_fmt_db(r.weight_sqnr_db):>10} "
                f"{_fmt_db(r.output_sqnr_db):>10}"
            )
    for e in report["embedding"]:
        tie = ", shares the lm_head's quantized table" if e["shared_with_lm_head"] else ""
        lines.append(
            f"  embedding {e['node']}: {e['scheme']}, weight SQNR {_fmt_db(e['weight_sqnr_db'])} dB{tie}"
        )
    kv = report["kv_cache"]
    if kv:
        med = kv["sqnr_db_median"]
        lines.append(
            f"  KV cache: {kv['entries'][0]['scheme']} static per channel on {len(kv['entries'])} entries; "
            f"SQNR median {_fmt_db(med['median'] if med else None)} dB (calibration samples)"
        )
    return "\n".join(lines)
