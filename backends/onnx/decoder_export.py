"""``export_decoder``: a transformers causal LM → quantized decode-step ONNX with a KV cache.

capture the decode step (:func:`capture_decoder`) → run a recipe on that QGraph → fuse attention
(:mod:`.attention`, on a copy; ``ExportOptions.fuse_attention``) → fold → export,
with the input/output names ORT-GenAI-style tools expect: ``input_ids``,
``past_key_values.{i}.key/value`` → ``logits``, ``present.{i}.key/value``, and named dynamic dims
``batch``, ``sequence``, ``past_sequence``. With fused attention the file also takes
``past_sequence_length`` (int64 ``[1]``): the cache may then be one fixed-size buffer that is both
past and present (``ExportOptions.share_kv_buffer``; :class:`.runtime.KVCache`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from qcompile.backends.onnx.attention import FuseAttentionReport, fuse_attention
from qcompile.backends.onnx.decoder import capture_decoder, example_decoder_inputs
from qcompile.backends.onnx.export import ExportOptions, ExportReport, export_onnx
from qcompile.backends.onnx.head import HeadQuantOptions, format_head_report, quantize_head
from qcompile.ir import QGraph


@dataclass
class DecoderExport:
    """The written file's report and the (quantized, unfolded) decode-step QGraph it came from —
    the reference the ONNX file is checked against (never attention-fused: the fusion is applied to
    a copy, and ``attention`` reports it)."""

    report: ExportReport
    qgraph: QGraph
    quantize_summary: str = ""
    attention: FuseAttentionReport | None = None


def quantize_decoder(
    qgraph: QGraph, recipe: Any, calibration: Sequence[torch.Tensor] | None = None
) -> tuple[QGraph, str]:
    """Run ``recipe`` on a decode-step QGraph. Calibration batches are token-id tensors; each is run
    as a prefill (empty cache), which is the plain forward over those tokens."""
    import qcompile

    layout = qgraph.info["decoder"]
    batches = None
    if calibration is not None:
        batches = [(ids, layout.empty(ids.shape[0])) for ids in calibration]
    example = example_decoder_inputs(layout)
    qm = qcompile.quantize(qgraph, recipe, calibration=batches, example_inputs=example, progress=False)
    qm.qgraph.info["decoder"] = layout
    return qm.qgraph, qm.summary()


def export_decoder(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    recipe: Any = "fp",
    calibration: Sequence[torch.Tensor] | None = None,
    options: ExportOptions | None = None,
    qgraph: QGraph | None = None,
    head: HeadQuantOptions | None = None,
) -> DecoderExport:
    """Capture, quantize with ``recipe`` (a recipe name, path, dict or Recipe), fold and export the
    decode step of ``model`` to ``path``. Pass ``qgraph`` (from :func:`capture_decoder`) to reuse a
    capture across recipes. ``head`` also quantizes lm_head / the embedding (:mod:`.head`)."""
    captured = qgraph if qgraph is not None else capture_decoder(model)
    layout = captured.info["decoder"]
    qg, summary = quantize_decoder(captured, recipe, calibration)
    if head is not None:
        head_report = quantize_head(qg, head)
        summary += "\n" + format_head_report(head_report)
    opts = replace(
        options or ExportOptions(),
        input_names=layout.input_names(),
        output_names=layout.output_names(),
        dim_names={(0, 0): "batch", (0, 1): "sequence", (1, 2): "past_sequence"},
        dynamic_shapes=layout.dynamic_shapes(),
    )
    exported, attention = qg, None
    if opts.fuse_attention:  # after quantization: the recipe sees the graph it was written for
        exported = qg.copy()
        attention = fuse_attention(exported)
        summary += "\n" + attention.summary()
    report = export_onnx(exported, example_decoder_inputs(layout), path, options=opts)
    if opts.fuse_attention and (opts.share_kv_buffer or opts.fuse_rotary):
        from qcompile.backends.onnx.optimize import rewrite_for_ort

        positions = getattr(model.config, "max_position_embeddings", None) if opts.fuse_rotary else None
        more = rewrite_for_ort(path, share_kv=opts.share_kv_buffer, rotary_positions=positions)
        head = report.rewrites + "; " if report.rewrites else "ORT rewrites: "
        report.rewrites = head + more.summary().removeprefix("ORT rewrites: ")
        report.refresh()
    return DecoderExport(report, qg, summary, attention)
