"""Target ``onnx``: the passes that turn a quantized QGraph into an ONNX model ONNX Runtime runs.

In pipeline order (decode-step-only passes marked *):

| pass | kind | what it does |
|---|---|---|
| ``keep_reference`` * | analysis | a copy of the quantized graph for ``onnx.verify`` |
| ``fuse_attention`` * | lowering | each attention core → ``qcompile::gqa_attention`` (QGraph) |
| ``fold_qdq`` | lowering | packed int4/int8 weights, ``qcompile::qlinear_*`` ops (QGraph) |
| ``onnx.export`` | lowering | QGraph → :class:`.model.OnnxModel` (torch.onnx + the op registry's translations) |
| ``onnx.share_kv_buffer`` * | equivalence | the past length as an input: one in-place KV buffer |
| ``onnx.pack_projections`` | equivalence | q/k/v and gate/up as one kernel each |
| ``onnx.rms_norm_div`` | equivalence | RMSNorm in the form ORT fuses |
| ``onnx.fuse_skip_rms_norm`` | equivalence | residual Add + RMSNorm → SkipSimplifiedLayerNormalization |
| ``onnx.fuse_rotary`` * | equivalence | RoPE inside GroupQueryAttention |
| ``onnx.pack_qkv_into_gqa`` * | equivalence | GroupQueryAttention reads the packed q/k/v |
| ``onnx.collapse_reshapes`` | equivalence | reshape-of-reshape chains → one reshape |
| ``onnx.qdq_format`` | lowering | only with ``int4_format = "qdq"``: MatMulNBits → DequantizeLinear(INT4) → MatMul |
| ``onnx.verify`` * | analysis | ORT vs the reference on random inputs; fails a float-activation model above the limit |

Any of them is turned off by name with the ``DisablePasses`` instrument (``QCOMPILE_DISABLE_PASSES``,
``export-onnx --disable-pass``); ``--disable-pass 'onnx.*'`` (a pattern matches the equivalence
passes only) gives the plain export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qcompile.pipeline.recipe import PassSpec
from qcompile.pipeline.targets import Target, register_target

REWRITES = (
    "onnx.share_kv_buffer",
    "onnx.pack_projections",
    "onnx.rms_norm_div",
    "onnx.fuse_skip_rms_norm",
    "onnx.fuse_rotary",
    "onnx.pack_qkv_into_gqa",
    "onnx.collapse_reshapes",
)
PASS_NAMES = (
    "keep_reference",
    "fuse_attention",
    "fold_qdq",
    "onnx.export",
    *REWRITES,
    "onnx.qdq_format",
    "onnx.verify",
)
DECODE_STEP_ONLY = frozenset(
    {
        "keep_reference",
        "fuse_attention",
        "onnx.share_kv_buffer",
        "onnx.fuse_rotary",
        "onnx.pack_qkv_into_gqa",
        "onnx.verify",
    }
)


@dataclass
class ExportOptions:
    """What target ``onnx`` writes. The rewrites are passes, not options: disable one by name."""

    opset: int = 21  # 21: blocked DequantizeLinear, int4 types
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations in-kernel (fast), 1 = fp32 (exact W4A16)
    optimize: bool = True  # the onnxscript optimizer after torch.onnx (constant folding, dead code)
    # matmulnbits: ORT's contrib op, accuracy level in the file; qdq: DequantizeLinear(INT4) → MatMul
    int4_format: Literal["matmulnbits", "qdq"] = "matmulnbits"
    # rows of RoPE's cos/sin cache inside GroupQueryAttention (the model's max_position_embeddings);
    # None leaves RoPE in the graph
    max_positions: int | None = None
    verify_limit: float = 1e-3  # onnx.verify: the max relative error of a float-activation model


def plan(options: ExportOptions, decode_step: bool) -> list[PassSpec]:
    """The passes (with their options) for ``options``; a graph that is not a decode step skips the
    decode-step ones."""
    export = {"opset": options.opset, "accuracy_level": options.accuracy_level, "optimize": options.optimize}
    pass_options = {"onnx.export": export, "onnx.fuse_rotary": {"max_positions": options.max_positions}}
    pass_options["onnx.verify"] = {"limit": options.verify_limit}
    names = [n for n in PASS_NAMES if n != "onnx.qdq_format" or options.int4_format == "qdq"]
    specs = [PassSpec(name, pass_options.get(name, {})) for name in names]
    return [s for s in specs if decode_step or s.name not in DECODE_STEP_ONLY]


def _artifact(ir, pipeline, options):
    from qcompile.backends.onnx.artifact import OnnxArtifact

    return OnnxArtifact.from_pipeline(ir, pipeline, options)


ONNX_TARGET = register_target(Target("onnx", PASS_NAMES, ExportOptions, plan, _artifact))
