"""The ``qcompile::`` quantization ops (torch.library custom ops), so a quantized QGraph stays a torch
program: it runs eager on any device, traces and exports with ``torch.export``, and later maps to
ONNX (``fold_qdq`` / the ONNX backend).

Each op has a reference implementation in plain torch (the primitives of :mod:`qcompile.quant.rtn`,
so graph and offline fake-quant agree bit for bit) and a fake implementation (shapes and dtypes
only) for FakeTensor propagation and export. Defined through
:mod:`qcompile.ops.registry` (the one op registry).

Schemas::

    qcompile::quantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int group_size) -> Tensor
    qcompile::dequantize(Tensor q, Tensor scale, Tensor zero_point, int group_size) -> Tensor
    qcompile::choose_qparams_per_token(Tensor x, int qmin, int qmax, bool symmetric) -> (Tensor, Tensor)

- ``quantize``: ``clamp(round(x / scale) + zero_point, qmin, qmax)`` as int8 (the container also
  for 4-bit values). Rounding half-to-even, as ONNX QuantizeLinear.
- ``dequantize``: ``(q - zero_point) * scale`` in ``scale``'s dtype.
- ``scale`` / ``zero_point`` broadcast against the data after their last dim is expanded by
  ``group_size`` along the data's last dim: ``group_size = 0`` means plain broadcasting (per
  tensor: 0-d; per output channel: [out, 1]; per token: [..., 1]); ``group_size = g`` means
  [..., ceil(n / g)] expanded with ``repeat_interleave(g)`` and sliced to n — a smaller final group,
  no padding (576 = 4·128 + 64).
- ``choose_qparams_per_token``: dynamic per-token parameters, reducing the last dim (keepdim):
  scale [..., 1] in ``x.dtype``, zero point int8 [..., 1]; symmetric ``absmax / ((qmax - qmin) / 2)``
  with zero point 0, asymmetric min/max over a range containing 0; an all-zero row gets scale 1.

ONNX mapping (for the exporter): weight ``dequantize`` with constant inputs → DequantizeLinear
(int8, or int4 with ``block_size = group_size``; fused by ORT into MatMulNBits before a MatMul);
``choose_qparams_per_token`` → ``quantize`` → ``dequantize`` → DynamicQuantizeLinear-style QDQ for
8-bit per-token activations; static ``quantize``/``dequantize`` → QuantizeLinear/DequantizeLinear.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompile.ops.registry import define
from qcompile.quant.rtn import choose_qparams_per_token_ref, dequantize_ref, quantize_ref

# Schemas are spelled out so the grid and group size are plain ``int`` (never symbolic): they are
# properties of the scheme, fixed when the graph is built.


@define(
    "quantize", "(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int group_size) -> Tensor"
)
def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, group_size: int) -> Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as int8 (groups: see the module docstring)."""
    return quantize_ref(x, scale, zero_point, qmin, qmax, group_size)


@quantize.register_fake
def _quantize_fake(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, group_size: int
) -> Tensor:
    return torch.empty_like(x, dtype=torch.int8)


@define("dequantize", "(Tensor q, Tensor scale, Tensor zero_point, int group_size) -> Tensor")
def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, group_size: int) -> Tensor:
    """``(q - zero_point) * scale`` in ``scale``'s dtype (groups: see the module docstring)."""
    return dequantize_ref(q, scale, zero_point, group_size)


@dequantize.register_fake
def _dequantize_fake(q: Tensor, scale: Tensor, zero_point: Tensor, group_size: int) -> Tensor:
    return torch.empty_like(q, dtype=scale.dtype)


@define("choose_qparams_per_token", "(Tensor x, int qmin, int qmax, bool symmetric) -> (Tensor, Tensor)")
def choose_qparams_per_token(x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-token (last dim, keepdim) scale in ``x.dtype`` and int8 zero point."""
    return choose_qparams_per_token_ref(x, qmin, qmax, symmetric)


@choose_qparams_per_token.register_fake
def _choose_qparams_per_token_fake(x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    shape = (*x.shape[:-1], 1)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int8)


# The OpOverloads passes insert and later passes match (one place, never compared as strings).
QUANTIZE = torch.ops.qcompile.quantize.default
DEQUANTIZE = torch.ops.qcompile.dequantize.default
CHOOSE_QPARAMS_PER_TOKEN = torch.ops.qcompile.choose_qparams_per_token.default
QUANT_OPS = {QUANTIZE, DEQUANTIZE, CHOOSE_QPARAMS_PER_TOKEN}
