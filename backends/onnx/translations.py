"""ONNX translations of the ``qcompile::`` ops, for ``torch.onnx.export(custom_translation_table=...)``.

Each function is traced by the torch.onnx exporter (onnxscript tracing mode): it receives the FX
node's arguments (ONNX values for tensors, Python ints/bools for the rest) and emits ONNX ops.

| qcompile op | ONNX |
|---|---|
| ``qlinear_w`` int4 packed / int8 blocked | ``com.microsoft.MatMulNBits`` (bits 4 / 8, ``block_size = group_size``) |
| ``qlinear_w`` plain int8 | ``DequantizeLinear`` (per axis or blocked) → ``MatMul`` |
| ``qlinear_wa``, int8 per-channel symmetric weights, symmetric activations | ``MatMulInteger`` (int8 × int8 → int32) then ``· x_scale · w_scale`` |
| ``qlinear_wa`` otherwise | the activation dequantized in float, then as ``qlinear_w`` |
| ``qembedding`` int4 packed / int8 blocked | ``com.microsoft.GatherBlockQuantized`` on the table a tied lm_head's MatMulNBits reads |
| ``qembedding`` plain int8 | ``Gather`` of rows and scales, then dequantize |
| ``quantize`` / ``dequantize`` / ``choose_qparams_per_token`` | the reference's float arithmetic (Round is half-to-even in both), blocked ``DequantizeLinear`` for groups |
| ``hadamard`` (online rotation, e.g. R4) | x as ``[…, K, 2^m]``: ``MatMul`` by ``H_{2^m}/√n`` then by ``H_Kᵀ`` (two small constants, O(n·(K + 2^m)) per row instead of n²); ``Pad`` / ``Reshape`` for padded and block-diagonal plans |

MatMulNBits' ``accuracy_level``: 0 or 1 keep the activation in fp32 (exactly W4A16's semantics); 4
quantizes the activation to int8 per block inside the kernel (ORT's fast CPU path, with a small error
of its own). The exporter chooses it for weight-only linears
(:class:`qcompile.backends.onnx.export.ExportOptions`), so the op registry holds a factory per op
(:data:`FACTORIES`, registered as the ``onnx`` implementations); a linear whose activation the recipe already
quantized (W4A8, W4A4) always gets level 1, so that activation is not rounded a second time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from onnx import TensorProto
from onnxscript import opset21 as op

from qcompile import ops
from qcompile.backends.onnx import contrib
from qcompile.backends.onnx.attention import gqa_attention_int8kv_onnx, gqa_attention_onnx
from qcompile.ops import GQA_ATTENTION, GQA_ATTENTION_INT8KV
from qcompile.ops.hadamard import HADAMARD
from qcompile.ops.qlinear import QEMBEDDING, QLINEAR_W, QLINEAR_WA
from qcompile.ops.registry import OPS, implementations, register_impl
from qcompile.quant.hadamard import plan_from_op_args, sylvester_matrix
from qcompile.quant.hadamard_k import k_matrix

BACKEND = "onnx"  # the op registry's name for these implementations
FLOAT = TensorProto.FLOAT
INT8 = TensorProto.INT8


def _f(value: float) -> Any:
    return op.Constant(value_float=float(value))


def _axes_last() -> Any:
    return op.Constant(value_ints=[-1])


# ---- activation ops ------------------------------------------------------------------------------


def quantize(x: Any, scale: Any, zero_point: Any, qmin: int, qmax: int, group_size: int) -> Any:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as int8, computed in float32."""
    if group_size != 0:
        raise NotImplementedError(
            "onnx export: qcompile::quantize with group_size > 0 (a grouped activation quantizer) has no "
            "translation; weights are quantized offline and never need it"
        )
    r = op.Round(op.Div(op.Cast(x, to=FLOAT), op.Cast(scale, to=FLOAT)))
    r = op.Add(r, op.Cast(zero_point, to=FLOAT))
    return op.Cast(op.Clip(r, _f(qmin), _f(qmax)), to=INT8)


def dequantize(q: Any, scale: Any, zero_point: Any, group_size: int) -> Any:
    """``(q - zero_point) * scale``; groups through blocked DequantizeLinear (ragged last block)."""
    if group_size > 0:
        return op.DequantizeLinear(q, scale, zero_point, axis=-1, block_size=group_size)
    diff = op.Sub(op.Cast(q, to=FLOAT), op.Cast(zero_point, to=FLOAT))
    return op.Mul(diff, op.Cast(scale, to=FLOAT))


def choose_qparams_per_token(x: Any, qmin: int, qmax: int, symmetric: bool) -> tuple[Any, Any]:
    """Per-token scale and int8 zero point over the last dim (rules of ``quantizers.py``)."""
    xf = op.Cast(x, to=FLOAT)
    if symmetric:
        absmax = op.ReduceMax(op.Abs(xf), _axes_last(), keepdims=1)
        scale = op.Div(absmax, _f((qmax - qmin) / 2))
    else:
        lo = op.Min(op.ReduceMin(xf, _axes_last(), keepdims=1), _f(0.0))
        hi = op.Max(op.ReduceMax(xf, _axes_last(), keepdims=1), _f(0.0))
        scale = op.Div(op.Sub(hi, lo), _f(qmax - qmin))
    scale = op.Where(op.Greater(scale, _f(0.0)), scale, _f(1.0))  # a zero range gets scale 1
    if symmetric:
        zero = op.Constant(value=_int8_scalar(0))
        return scale, op.Expand(zero, op.Shape(scale))
    zp = op.Sub(_f(qmin), op.Round(op.Div(lo, scale)))
    return scale, op.Cast(op.Clip(zp, _f(qmin), _f(qmax)), to=INT8)


def _int8_scalar(v: int) -> Any:
    import onnx_ir as ir

    return ir.tensor(torch.tensor(v, dtype=torch.int8).numpy())


# ---- linears ---------------------------------------------------------------------------------------


def _dequantize_x(xq: Any, x_scale: Any, x_zero_point: Any) -> Any:
    xf = op.Cast(xq, to=FLOAT)
    if x_zero_point is not None:
        xf = op.Sub(xf, op.Cast(x_zero_point, to=FLOAT))
    return op.Mul(xf, op.Cast(x_scale, to=FLOAT))


def _add_bias(y: Any, bias: Any) -> Any:
    return y if bias is None else op.Add(y, bias)


def _int8_weight_matmul(x: Any, w: Any, w_scale: Any, w_zero_point: Any, group_size: int) -> Any:
    """x @ Ŵᵀ with Ŵ from DequantizeLinear: per output channel (axis 0) or blocked along K."""
    if group_size == 0:
        s = op.Reshape(w_scale, op.Constant(value_ints=[-1]))
        z = None if w_zero_point is None else op.Reshape(w_zero_point, op.Constant(value_ints=[-1]))
        w_hat = op.DequantizeLinear(w, s, z, axis=0)
    else:
        w_hat = op.DequantizeLinear(w, w_scale, w_zero_point, axis=1, block_size=group_size)
    return op.MatMul(x, op.Transpose(w_hat, perm=[1, 0]))


def _blocked(w: Any) -> bool:
    """A blocked 8-bit weight ``[out, G, g]`` (rank 3), vs plain int8 ``[out, in]``."""
    return w.shape is not None and len(w.shape) == 3


def make_qlinear_w(accuracy_level: int) -> Callable[..., Any]:
    """The ``qlinear_w`` translation with MatMulNBits' accuracy level fixed."""

    def qlinear_w(
        x: Any,
        w: Any,
        w_scale: Any,
        w_zero_point: Any,
        bias: Any,
        w_bits: int,
        in_features: int,
        group_size: int,
    ) -> Any:
        if w_bits == 4 or _blocked(w):  # int4 packed / int8 blocked: MatMulNBits' own layouts
            y = contrib.MatMulNBits(
                x,
                w,
                w_scale,
                w_zero_point,
                K=in_features,
                N=int(w.shape[0]),
                bits=w_bits,
                block_size=group_size,
                accuracy_level=accuracy_level,
            )
        else:
            y = _int8_weight_matmul(x, w, w_scale, w_zero_point, group_size)
        return _add_bias(y, bias)

    return qlinear_w


def make_qlinear_wa(accuracy_level: int) -> Callable[..., Any]:
    """The ``qlinear_wa`` translation: an integer GEMM where the scheme allows one, else the activation
    dequantized into a ``MatMulNBits`` at accuracy level 1 whatever ``accuracy_level`` says: the
    activation is already on its 4- or 8-bit per-token grid, and level 4 would quantize it a second
    time, to int8 per block of the weight's group (on SmolLM2's W4A4 recipes that second rounding
    moved perplexity by ±1 %, against ≤ 0.3 % at level 1; BENCHMARKS.md)."""
    del accuracy_level  # see the docstring
    qlinear_w = make_qlinear_w(1)

    def qlinear_wa(
        xq: Any,
        x_scale: Any,
        x_zero_point: Any,
        w: Any,
        w_scale: Any,
        w_zero_point: Any,
        bias: Any,
        w_bits: int,
        in_features: int,
        group_size: int,
    ) -> Any:
        integer_gemm = w_bits == 8 and group_size == 0 and w_zero_point is None and x_zero_point is None
        if not integer_gemm:
            x_hat = _dequantize_x(xq, x_scale, x_zero_point)
            return qlinear_w(x_hat, w, w_scale, w_zero_point, bias, w_bits, in_features, group_size)
        acc = op.MatMulInteger(xq, op.Transpose(w, perm=[1, 0]))  # exact int32 sums
        w_row = op.Reshape(w_scale, op.Constant(value_ints=[-1]))
        y = op.Mul(op.Mul(op.Cast(acc, to=FLOAT), op.Cast(x_scale, to=FLOAT)), w_row)
        return _add_bias(y, bias)

    return qlinear_wa


def qembedding(
    ids: Any, w: Any, w_scale: Any, w_zero_point: Any, w_bits: int, dim: int, group_size: int
) -> Any:
    """int4 packed / int8 blocked: ORT's GatherBlockQuantized reading the ``[vocab, G, …]`` table
    itself — the initializer a tied lm_head's MatMulNBits reads, so it is stored once — then the
    ``G × g`` row cut to ``dim`` (the ragged last block's padding). Plain int8: Gather + dequantize."""
    if w_bits == 4 or _blocked(w):
        if w_zero_point is not None:
            raise NotImplementedError(
                "onnx export: an asymmetric blocked embedding is not translated (GatherBlockQuantized "
                "wants its zero points laid out per block); quantize the embedding symmetric"
            )
        groups = -(-dim // group_size)
        scale = op.Unsqueeze(w_scale, op.Constant(value_ints=[-1]))  # [vocab, G, 1]: the rank of the table
        rows = contrib.GatherBlockQuantized(
            w, ids, scale, None, bits=w_bits, block_size=group_size, gather_axis=0, quantize_axis=2
        )  # [*ids, G, g]
        flat = op.Reshape(
            rows, op.Concat(op.Shape(ids), op.Constant(value_ints=[groups * group_size]), axis=0)
        )
        if groups * group_size == dim:
            return flat
        return op.Slice(
            flat, op.Constant(value_ints=[0]), op.Constant(value_ints=[dim]), op.Constant(value_ints=[-1])
        )
    rows = op.Gather(w, ids, axis=0)
    scale = op.Gather(w_scale, ids, axis=0)
    zp = None if w_zero_point is None else op.Gather(w_zero_point, ids, axis=0)
    if group_size > 0:
        return op.DequantizeLinear(rows, scale, zp, axis=-1, block_size=group_size)
    return _dequantize_x(rows, scale, zp)


# ---- online Hadamard ------------------------------------------------------------------------------


def _const(t: torch.Tensor) -> Any:
    import onnx_ir as ir

    return op.Constant(value=ir.tensor(t.to(torch.float32).contiguous().numpy()))


def _last_dims(x: Any, dims: list[int]) -> Any:
    """``Reshape`` target: x's leading dims (all but the last) followed by ``dims``."""
    return op.Concat(op.Shape(x, start=0, end=-1), op.Constant(value_ints=dims), axis=0)


def _kron(x: Any, block: int, k: int) -> Any:
    """``x @ (H_K ⊗ H_p) / √block`` over the last dim: with x as ``[…, K, p]`` that is
    ``H_Kᵀ · X · H_p`` (the same factorisation as :func:`qcompile.quant.hadamard._kron_transform`)."""
    p = block // k
    y = op.Reshape(x, _last_dims(x, [k, p]))
    y = op.MatMul(y, _const(sylvester_matrix(p).double() / block**0.5))
    if k > 1:
        y = op.MatMul(_const(k_matrix(k).double().T), y)
    return op.Reshape(y, _last_dims(x, [block]))


def hadamard(x: Any, n: int, block: int, k: int) -> Any:
    """``qcompile::hadamard``: the plan rebuilt from the op's integers, applied as two small MatMuls
    (never the dense n×n matrix: R4 on SmolLM2's 1536-wide down_proj input would be 9 MB a layer)."""
    plan = plan_from_op_args(n, block, k)
    if plan.is_identity:
        return op.Identity(x)
    if plan.kind == "padded":
        pads = op.Constant(value_ints=[0, block - n])
        return _kron(op.Pad(x, pads, None, op.Constant(value_ints=[-1])), block, k)
    if plan.kind == "block_diagonal":
        blocks = op.Reshape(x, _last_dims(x, [n // block, block]))
        return op.Reshape(_kron(blocks, block, k), _last_dims(x, [n]))
    return _kron(x, block, k)


def fixed(translation: Callable[..., Any]) -> Callable[[int], Callable[..., Any]]:
    """A translation that does not depend on the accuracy level, as the factory the registry holds."""

    def factory(accuracy_level: int) -> Callable[..., Any]:
        del accuracy_level
        return translation

    factory.__qualname__ = factory.__name__ = f"fixed({translation.__name__})"
    return factory


# The ONNX column of the op registry (``qcompile.ops.coverage_table()``): per op a factory taking
# MatMulNBits' accuracy level and returning the function torch.onnx traces.
FACTORIES: dict[Any, Callable[[int], Callable[..., Any]]] = {
    ops.QUANTIZE: fixed(quantize),
    ops.DEQUANTIZE: fixed(dequantize),
    ops.CHOOSE_QPARAMS_PER_TOKEN: fixed(choose_qparams_per_token),
    QLINEAR_W: make_qlinear_w,
    QLINEAR_WA: make_qlinear_wa,
    QEMBEDDING: fixed(qembedding),
    GQA_ATTENTION: fixed(gqa_attention_onnx),
    GQA_ATTENTION_INT8KV: fixed(gqa_attention_int8kv_onnx),
    HADAMARD: fixed(hadamard),
}
for _op, _factory in FACTORIES.items():
    register_impl(BACKEND, _op, _factory)


def translation_table(accuracy_level: int) -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """``custom_translation_table`` for torch.onnx: every op with an ONNX implementation in the op
    registry, its translation built for ``accuracy_level``."""
    return {OPS[name].overload: factory(accuracy_level) for name, factory in implementations(BACKEND).items()}
