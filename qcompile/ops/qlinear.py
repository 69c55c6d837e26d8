"""The folded quantized-linear ops (``qcompile::qlinear_w``, ``qcompile::qlinear_wa``), the quantized
embedding lookup (``qcompile::qembedding``). ``fold_qdq`` forms
them; backends map them to kernels (ONNX: MatMulNBits, MatMulInteger, GatherBlockQuantized).
Defined through :mod:`qcompile.ops.registry` (the one op registry).

Schemas::

    qcompile::qembedding(Tensor ids, Tensor w, Tensor w_scale, Tensor? w_zero_point, int w_bits,
                         int dim, int group_size) -> Tensor
    qcompile::qlinear_w(Tensor x, Tensor w, Tensor w_scale, Tensor? w_zero_point, Tensor? bias,
                        int w_bits, int in_features, int group_size) -> Tensor
    qcompile::qlinear_wa(Tensor xq, Tensor x_scale, Tensor? x_zero_point, Tensor w, Tensor w_scale,
                         Tensor? w_zero_point, Tensor? bias, int w_bits, int in_features,
                         int group_size) -> Tensor

- ``qlinear_w``: weight-only (W4A16, W8A16): ``linear(x, Ŵ, bias)``.
- ``qembedding``: a quantized embedding table (``embedding(ids, Ŵ)``); a tied lm_head and embedding
  share one packed constant.
- ``qlinear_wa``: integer activations (W8A8, W4A8, W4A4; dynamic per token or static per tensor):
  ``xq`` is the int8 container of the quantized input, ``x_scale`` / ``x_zero_point`` broadcast
  against it (per token ``[..., 1]`` or per tensor 0-d); ``linear((xq - x_zp) * x_scale, Ŵ, bias)``.
  A None zero point means symmetric (all zeros), which lets a backend pick a pure integer GEMM.

Weight storage: :mod:`qcompile.quant.packing` (MatMulNBits' int4 layout, blocked int8, plain int8).

Reference implementations unpack to the unfolded form and call :func:`qcompile.quant.rtn.dequantize_ref`
and ``torch.nn.functional.linear``: the folded graph computes the very same float operations as the
unfolded ``linear(dequantize(quantize(x)), dequantize(q))`` graph, so outputs match bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompile.ops.registry import define
from qcompile.quant.packing import dequantize_weight
from qcompile.quant.rtn import dequantize_ref

# ---- the ops -------------------------------------------------------------------------------------


@define(
    "qlinear_w",
    "(Tensor x, Tensor w, Tensor w_scale, Tensor? w_zero_point, Tensor? bias, int w_bits, "
    "int in_features, int group_size) -> Tensor",
)
def qlinear_w(
    x: Tensor,
    w: Tensor,
    w_scale: Tensor,
    w_zero_point: Tensor | None,
    bias: Tensor | None,
    w_bits: int,
    in_features: int,
    group_size: int,
) -> Tensor:
    """Weight-only quantized linear: ``linear(x, Ŵ, bias)``."""
    w_hat = dequantize_weight(w, w_scale, w_zero_point, w_bits, in_features, group_size)
    return torch.nn.functional.linear(x, w_hat, bias)


@qlinear_w.register_fake
def _qlinear_w_fake(x, w, w_scale, w_zero_point, bias, w_bits, in_features, group_size):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@define(
    "qlinear_wa",
    "(Tensor xq, Tensor x_scale, Tensor? x_zero_point, Tensor w, Tensor w_scale, "
    "Tensor? w_zero_point, Tensor? bias, int w_bits, int in_features, int group_size) -> Tensor",
)
def qlinear_wa(
    xq: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor | None,
    w: Tensor,
    w_scale: Tensor,
    w_zero_point: Tensor | None,
    bias: Tensor | None,
    w_bits: int,
    in_features: int,
    group_size: int,
) -> Tensor:
    """Quantized-activation linear: ``linear((xq - x_zp) * x_scale, Ŵ, bias)``."""
    x_zp = x_zero_point if x_zero_point is not None else torch.zeros_like(x_scale, dtype=torch.int8)
    x_hat = dequantize_ref(xq, x_scale, x_zp, 0)
    w_hat = dequantize_weight(w, w_scale, w_zero_point, w_bits, in_features, group_size)
    return torch.nn.functional.linear(x_hat, w_hat, bias)


@qlinear_wa.register_fake
def _qlinear_wa_fake(
    xq, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, w_bits, in_features, group_size
):
    return xq.new_empty((*xq.shape[:-1], w.shape[0]), dtype=x_scale.dtype)


@define(
    "qembedding",
    "(Tensor ids, Tensor w, Tensor w_scale, Tensor? w_zero_point, int w_bits, int dim, "
    "int group_size) -> Tensor",
)
def qembedding(
    ids: Tensor,
    w: Tensor,
    w_scale: Tensor,
    w_zero_point: Tensor | None,
    w_bits: int,
    dim: int,
    group_size: int,
) -> Tensor:
    """Quantized table lookup: ``embedding(ids, Ŵ)``, dequantizing only the gathered rows (the same
    elementwise formula, so equal to looking up the dequantized table). Storage as for linears."""
    flat = ids.reshape(-1)
    zp = w_zero_point[flat] if w_zero_point is not None else None
    rows = dequantize_weight(w[flat], w_scale[flat], zp, w_bits, dim, group_size)
    return rows.reshape(*ids.shape, dim)


@qembedding.register_fake
def _qembedding_fake(ids, w, w_scale, w_zero_point, w_bits, dim, group_size):
    return w_scale.new_empty((*ids.shape, dim))


QEMBEDDING = torch.ops.qcompile.qembedding.default
QLINEAR_W = torch.ops.qcompile.qlinear_w.default
QLINEAR_WA = torch.ops.qcompile.qlinear_wa.default
QLINEAR_OPS = {QLINEAR_W, QLINEAR_WA}
