"""The ONNX backend: target ``onnx`` (:mod:`.target`) lowers a quantized QGraph to an ONNX model ONNX
Runtime runs, and :mod:`.runtime` runs it.

It contributes, and only contributes:

- ONNX implementations of the ``qcompile::`` ops (:mod:`.translations`, registered in the op
  registry as backend ``onnx``);
- passes: ``onnx.export`` (QGraph → :class:`OnnxModel`, :mod:`.export`), the ONNX Runtime rewrites
  (:mod:`.kv_buffer`, :mod:`.pack_projections`, :mod:`.rms_norm`, :mod:`.rotary`,
  :mod:`.packed_qkv`, :mod:`.reshapes`), ``onnx.qdq_format`` (:mod:`.qdq_format`) and ``onnx.verify``
  (:mod:`.verify`), with the facts they declare (:mod:`.facts`);
- the target itself (:mod:`.target`: which passes, in which order, for which :class:`ExportOptions`),
  its artifact (:class:`OnnxArtifact`: ``save(path)`` writes the one file and returns an
  :class:`ExportReport`) and the runtime (:class:`OrtDecoder`, :class:`KVCache`, :func:`make_session`).

Exporting is ``qcompile.lower(quantized, target="onnx")`` or ``QuantizedModel.export_onnx``; a
transformers decoder's decode step with its KV cache is :func:`qcompile.tools.export.export_decoder`.
"""

from qcompile.backends.onnx import (  # noqa: F401  (register the ONNX passes)
    export,
    kv_buffer,
    pack_projections,
    packed_qkv,
    qdq_format,
    reshapes,
    rms_norm,
    rotary,
    translations,
    verify,
)
from qcompile.backends.onnx.accuracy import ACCURACY_LEVEL_CONFIG, set_accuracy_level
from qcompile.backends.onnx.artifact import OnnxArtifact
from qcompile.backends.onnx.linears import LinearExport
from qcompile.backends.onnx.model import PAST_LENGTH_INPUT, OnnxModel
from qcompile.backends.onnx.qdq_format import matmulnbits_file_to_qdq, matmulnbits_to_qdq
from qcompile.backends.onnx.report import ExportReport
from qcompile.backends.onnx.runtime import KVCache, OrtDecoder, SessionOptions, make_session, run_flat
from qcompile.backends.onnx.target import ONNX_TARGET, REWRITES, ExportOptions
from qcompile.frontend.decoder import CacheLayout, capture_decoder

__all__ = [
    "ACCURACY_LEVEL_CONFIG",
    "ONNX_TARGET",
    "PAST_LENGTH_INPUT",
    "REWRITES",
    "CacheLayout",
    "ExportOptions",
    "ExportReport",
    "KVCache",
    "LinearExport",
    "OnnxArtifact",
    "OnnxModel",
    "OrtDecoder",
    "SessionOptions",
    "capture_decoder",
    "make_session",
    "matmulnbits_file_to_qdq",
    "matmulnbits_to_qdq",
    "run_flat",
    "set_accuracy_level",
]
