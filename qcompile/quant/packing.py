"""Weight layouts of the folded quantized ops (``qcompile::qlinear_w``, ``qlinear_wa``, ``qembedding``):
packing, unpacking, and the unfolded ``(q, zero_point)`` they stand for. Pure tensor math, no graph.

Weight storage ``w`` (``Ŵ = (q - zero_point) * scale``, groups along ``in``, ragged last group):

- ``w_bits = 8``, plain: ``q`` itself, int8 ``[out, in]``; ``w_scale`` ``[out, G]``, ``w_zero_point``
  int8 ``[out, G]`` or None; ``G = 1`` per output channel (``group_size = 0``) or ``ceil(in / g)``.
  Used by ``qlinear_wa`` (an integer GEMM reads it as is) and where the group is not a block size.
- ``w_bits = 8``, blocked (told apart by dtype uint8 and rank 3): ``[out, G, g]`` offset-binary
  ``u = q + 128``, the ragged last group padded with 128 (q = 0) — MatMulNBits' 8-bit layout, for
  weight-only linears and embeddings with a power-of-two group ≥ 16; ``w_zero_point`` None or uint8
  ``[out, G]`` holding ``zero_point + 128``.
- ``w_bits = 4``: packed uint8 ``[out, G, g / 2]`` in ONNX Runtime's MatMulNBits layout. Each value
  is stored offset-binary, ``u = q + 8`` (uint4, 0..15), two per byte, **low nibble first**: byte j
  of a block holds element 2j in bits 0-3 and element 2j+1 in bits 4-7 (the order of ONNX
  INT4/UINT4 tensors). The ragged last group is padded with ``u = 8`` (q = 0) up to ``g``; the
  padding is never read (``in_features`` bounds every row). ``w_scale`` ``[out, G]``;
  ``w_zero_point`` None (symmetric: q's zero point 0 is u's 8, MatMulNBits' default) or packed
  uint8 ``[out, ceil(G / 2)]`` holding ``zero_point + 8``, same nibble order, a last odd nibble 8.
  ``group_size`` must be a power of two ≥ 16 (MatMulNBits' block rule).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qcompile.quant.rtn import dequantize_ref

INT4_OFFSET = 8  # signed int4 q in [-8, 7] is stored as u = q + 8 in [0, 15]
UINT8_OFFSET = 128  # signed int8 q in a blocked 8-bit layout is stored as u = q + 128


# ---- int4 packing (MatMulNBits layout) -------------------------------------------------------------


def int4_packable(group_size: int) -> bool:
    """MatMulNBits' block rule: a power of two, at least 16."""
    return group_size >= 16 and group_size & (group_size - 1) == 0


def _pack_nibbles(u: Tensor) -> Tensor:
    """uint4 values (any int dtype, 0..15) with an even last dim -> uint8, low nibble first."""
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 -> uint4 values as int16 (last dim doubled), low nibble first."""
    p = packed.to(torch.int16)
    return torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).flatten(-2)


def pack_int4_weight(q: Tensor, group_size: int) -> Tensor:
    """Signed int4 ``q`` int8 ``[out, in]`` -> packed uint8 ``[out, G, g / 2]`` (module docstring)."""
    if not int4_packable(group_size):
        raise ValueError(f"int4 packing needs a group size that is a power of two >= 16, got {group_size}")
    if q.dim() != 2:
        raise ValueError(f"pack_int4_weight expects q [out, in], got shape {tuple(q.shape)}")
    if int(q.min()) < -8 or int(q.max()) > 7:
        raise ValueError(f"values out of the int4 range [-8, 7]: [{int(q.min())}, {int(q.max())}]")
    out_f, in_f = q.shape
    groups = math.ceil(in_f / group_size)
    u = q.to(torch.int16) + INT4_OFFSET
    u = torch.nn.functional.pad(u, (0, groups * group_size - in_f), value=INT4_OFFSET)
    return _pack_nibbles(u.view(out_f, groups, group_size)).contiguous()


def unpack_int4_weight(packed: Tensor, in_features: int) -> Tensor:
    """Packed uint8 ``[out, G, g / 2]`` -> signed int8 ``[out, in_features]`` (padding dropped)."""
    out_f = packed.shape[0]
    u = _unpack_nibbles(packed).reshape(out_f, -1)[:, :in_features]
    return (u - INT4_OFFSET).to(torch.int8)


def pack_int4_zero_point(zero_point: Tensor) -> Tensor:
    """int8 ``[out, G]`` zero points (in [-8, 7]) -> packed uint8 ``[out, ceil(G / 2)]`` of ``zp + 8``."""
    u = zero_point.to(torch.int16) + INT4_OFFSET
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=INT4_OFFSET)
    return _pack_nibbles(u).contiguous()


def unpack_int4_zero_point(packed: Tensor, groups: int) -> Tensor:
    return (_unpack_nibbles(packed)[..., :groups] - INT4_OFFSET).to(torch.int8)


def pack_int8_blocked(q: Tensor, group_size: int) -> Tensor:
    """Signed int8 ``q`` ``[out, in]`` -> uint8 ``[out, G, g]`` of ``q + 128`` (MatMulNBits, 8 bits)."""
    if not int4_packable(group_size):
        raise ValueError(f"blocked int8 needs a group size that is a power of two >= 16, got {group_size}")
    out_f, in_f = q.shape
    groups = math.ceil(in_f / group_size)
    u = torch.nn.functional.pad(
        q.to(torch.int16) + UINT8_OFFSET, (0, groups * group_size - in_f), value=UINT8_OFFSET
    )
    return u.to(torch.uint8).view(out_f, groups, group_size).contiguous()


def unpack_int8_blocked(w: Tensor, in_features: int) -> Tensor:
    return (w.reshape(w.shape[0], -1)[:, :in_features].to(torch.int16) - UINT8_OFFSET).to(torch.int8)


def is_blocked_int8(w: Tensor) -> bool:
    return w.dtype == torch.uint8 and w.dim() == 3


# ---- reference math ---------------------------------------------------------------------------------


def weight_int8(
    w: Tensor, w_scale: Tensor, w_zero_point: Tensor | None, w_bits: int, in_features: int
) -> tuple[Tensor, Tensor]:
    """The unfolded ``(q, zero_point)``, both int8: unpacked for 4-bit, zeros for a None zero point."""
    if w_bits == 4:
        q = unpack_int4_weight(w, in_features)
        zp = None if w_zero_point is None else unpack_int4_zero_point(w_zero_point, w_scale.shape[-1])
    elif w_bits == 8 and is_blocked_int8(w):
        q = unpack_int8_blocked(w, in_features)
        zp = None if w_zero_point is None else (w_zero_point.to(torch.int16) - UINT8_OFFSET).to(torch.int8)
    elif w_bits == 8:
        q, zp = w, w_zero_point
    else:
        raise ValueError(f"qlinear: w_bits must be 4 or 8, got {w_bits}")
    if zp is None:
        zp = torch.zeros(w_scale.shape, dtype=torch.int8, device=w_scale.device)
    return q, zp


def dequantize_weight(
    w: Tensor, w_scale: Tensor, w_zero_point: Tensor | None, w_bits: int, in_features: int, group_size: int
) -> Tensor:
    """Ŵ ``[out, in]`` in ``w_scale``'s dtype, exactly as ``qcompile::dequantize`` on the unfolded q."""
    q, zp = weight_int8(w, w_scale, w_zero_point, w_bits, in_features)
    return dequantize_ref(q, w_scale, zp, group_size)
