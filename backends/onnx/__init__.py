"""The ONNX backend: export a QGraph to ONNX (torch.onnx dynamo exporter + translations of the
``qcompile::`` ops) and run it with ONNX Runtime.

- :func:`export_onnx` — any QGraph (e.g. a captured prefill ``model(input_ids)``), float or quantized;
- :func:`capture_decoder` / :func:`export_decoder` — a decode step with the KV cache as inputs and
  outputs, so a generation loop runs in ORT (:class:`OrtDecoder`, greedy ``generate``);
- :class:`HeadQuantOptions` / :func:`quantize_head` — also quantize lm_head and the embedding;
- :func:`matmulnbits_to_qdq`, :func:`set_accuracy_level` — rewrite a written file (standard
  DequantizeLinear(INT4) form; MatMulNBits' accuracy level);
- :func:`rewrite_for_ort` — the post-export rewrites (:mod:`.optimize`: packed projections, fused
  norms, RoPE inside attention, a shared in-place KV buffer), applied by the exporters by default;
- :func:`make_session` — ORT sessions (CPU EP; CUDA EP when installed); :class:`KVCache` — the
  in-place cache :meth:`OrtDecoder.step_inplace` and ``generate`` run on.
"""

from qcompile.backends.onnx.decoder_export import DecoderExport, export_decoder, quantize_decoder
from qcompile.backends.onnx.export import (
    ExportOptions,
    ExportReport,
    LinearExport,
    OnnxExportError,
    export_onnx,
    set_accuracy_level,
)
from qcompile.backends.onnx.head import HeadQuantOptions, quantize_head
from qcompile.backends.onnx.optimize import OptimizeReport, rewrite_for_ort
from qcompile.backends.onnx.qdq_format import matmulnbits_to_qdq
from qcompile.backends.onnx.runtime import KVCache, OrtDecoder, SessionOptions, make_session, run_flat
from qcompile.frontend.decoder import CacheLayout, DecoderStep, capture_decoder

__all__ = [
    "CacheLayout",
    "DecoderExport",
    "DecoderStep",
    "ExportOptions",
    "ExportReport",
    "HeadQuantOptions",
    "KVCache",
    "LinearExport",
    "OnnxExportError",
    "OptimizeReport",
    "OrtDecoder",
    "SessionOptions",
    "capture_decoder",
    "export_decoder",
    "export_onnx",
    "make_session",
    "matmulnbits_to_qdq",
    "quantize_decoder",
    "quantize_head",
    "rewrite_for_ort",
    "run_flat",
    "set_accuracy_level",
]
