"""Every ``qcompile::`` op, defined in one package (:mod:`qcompile.ops.registry` holds the table).

- :mod:`.quant` — ``quantize``, ``dequantize``, ``choose_qparams_per_token`` (Q/DQ in a graph);
- :mod:`.qlinear` — ``qlinear_w``, ``qlinear_wa``, ``qembedding`` (folded quantized linears and
  lookups on packed weights, :mod:`qcompile.quant.packing`);
- :mod:`.hadamard` — ``hadamard`` (an online rotation);
- :mod:`.attention` — ``gqa_attention``, ``gqa_attention_int8kv`` (fused attention with a KV cache).

Each op has its schema, its torch reference implementation and its fake next to each other; importing
this package (``import qcompile`` does) defines them all, so any graph qcompile produces runs. The
OpOverloads below are what passes insert and match — never op names compared as strings.
"""

from qcompile.ops import attention, hadamard, qlinear, quant  # noqa: F401  (define the ops)
from qcompile.ops.attention import GQA_ATTENTION, GQA_ATTENTION_INT8KV
from qcompile.ops.hadamard import HADAMARD
from qcompile.ops.qlinear import QEMBEDDING, QLINEAR_OPS, QLINEAR_W, QLINEAR_WA
from qcompile.ops.quant import (
    CHOOSE_QPARAMS_PER_TOKEN,
    DEQUANTIZE,
    QUANT_OPS,
    QUANTIZE,
    choose_qparams_per_token,
    dequantize,
    quantize,
)
from qcompile.ops.registry import (
    OPS,
    KernelImpl,
    OpDef,
    coverage,
    coverage_table,
    implementation,
    register_impl,
)

__all__ = [
    "KernelImpl",
    "CHOOSE_QPARAMS_PER_TOKEN",
    "DEQUANTIZE",
    "GQA_ATTENTION",
    "GQA_ATTENTION_INT8KV",
    "HADAMARD",
    "OPS",
    "QEMBEDDING",
    "QLINEAR_OPS",
    "QLINEAR_W",
    "QLINEAR_WA",
    "QUANTIZE",
    "QUANT_OPS",
    "OpDef",
    "choose_qparams_per_token",
    "coverage",
    "coverage_table",
    "dequantize",
    "implementation",
    "quantize",
    "register_impl",
]
