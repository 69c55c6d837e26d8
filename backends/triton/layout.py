"""Weight layout of the Triton weight-only linear kernels (:mod:`.wo_linear`), repacked once at lowering
from qcompile's storage (:mod:`qcompile.quant.packing`). Pure tensor math, no Triton.

The kernels compute ``y = x Ŵᵀ`` with ``Ŵ = (q - zp) · scale`` and walk K (``in_features``) in their
inner loop, one ``[BLOCK_K, BLOCK_N]`` weight tile per step. Everything is therefore stored **K-major,
N contiguous** (the transpose of qcompile's ``[out, in]``):

- ``w_bits = 4``: int32 ``[ceil(K / 8), N]``; word ``[k8, n]`` holds the 8 values ``k = 8·k8 … 8·k8+7``
  of column n, offset-binary ``u = q + 8`` (0..15), value ``k = 8·k8 + i`` in bits ``4i … 4i+3`` (low
  nibble first, as in MatMulNBits). Padding past K (up to a multiple of 8) holds u = 8 and is never
  used: the kernels load x as 0 there.
- ``w_bits = 8``: int8 ``[K, N]``, the signed q itself (plain and blocked storage both end here).
- ``scales``: ``[G, N]`` in the scale's dtype; ``G = ceil(K / group_size)`` (ragged last group), 1 per
  output channel (``group_size = 0``).
- ``zeros``: None (symmetric) or int8 ``[G, N]`` **in the weight's stored offset**: ``zp + 8`` for
  int4 (so the kernel subtracts it from u directly, ``u - (zp + 8) = q - zp``; a None zero point is
  the constant 8), ``zp`` for int8 (None is 0).

Why this layout:

- *Coalesced tile loads.* Neighbouring lanes of a warp own neighbouring output columns n, so with n
  contiguous a warp's load of one K row of the tile is one contiguous segment, for the GEMV path
  (M ≤ 8, where this load *is* the kernel's time) and for the GEMM path alike. MatMulNBits' ``[N, G,
  g/2]`` would make those lanes stride by ``K/2`` bytes.
- *Eight int4 per 32-bit word along K.* One 4-byte load per lane brings 8 weights of one column;
  unpacking is a shift by ``4·(k mod 8)`` and a mask, with no cross-lane shuffles. The kernels
  address the tile as ``[BLOCK_K, BLOCK_N]`` with row ``k // 8``, so each word is requested by 8
  consecutive k rows of the tile; those requests hit L1 after the first (the same trick GPTQ-style
  and GemLite kernels use), and the dequantized tile comes out in the ``[K, N]`` order ``tl.dot``
  wants, without an in-register interleave.
- *Scales and zero points ``[G, N]``.* A K tile never straddles a group when ``BLOCK_K`` divides the
  group size, so the kernel loads one contiguous row of ``BLOCK_N`` scales per K step.
- *Zero points kept integer and unscaled.* ``(u - zp)`` is exact in fp32 and is multiplied by the
  scale once, exactly as :func:`qcompile.quant.rtn.dequantize_ref` does, so the dequantized weights
  are bit-identical to the reference's; a precomputed ``zp·scale`` would round twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qcompile.quant.packing import (
    INT4_OFFSET,
    UINT8_OFFSET,
    is_blocked_int8,
    unpack_int4_weight,
    unpack_int4_zero_point,
    unpack_int8_blocked,
)

INT4_PER_WORD = 8


@dataclass(frozen=True)
class PackedWeight:
    """A weight in the kernels' layout (module docstring); ``w_bits``/``in_features``/``group_size``
    keep qcompile's meaning (``group_size = 0``: one group per output channel)."""

    w: Tensor
    scales: Tensor
    zeros: Tensor | None
    w_bits: int
    in_features: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.w.shape[1]


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)


def pack_int4_words(u: Tensor) -> Tensor:
    """uint4 values ``[N, K]`` (any int dtype, 0..15) -> int32 ``[ceil(K / 8), N]``, 8 along K per word,
    low nibble first; K padded with 8 (q = 0)."""
    n, k = u.shape
    words = math.ceil(k / INT4_PER_WORD)
    u = torch.nn.functional.pad(u.to(torch.int64), (0, words * INT4_PER_WORD - k), value=INT4_OFFSET)
    shifts = torch.arange(INT4_PER_WORD, dtype=torch.int64, device=u.device) * 4
    packed = (u.view(n, words, INT4_PER_WORD) << shifts).sum(-1)  # < 2^32, exact in int64
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement for int32
    return packed.to(torch.int32).t().contiguous()


def unpack_int4_words(packed: Tensor, in_features: int) -> Tensor:
    """The inverse of :func:`pack_int4_words`: int32 ``[ceil(K / 8), N]`` -> uint4 values int16 ``[N, K]``."""
    shifts = torch.arange(INT4_PER_WORD, dtype=torch.int64, device=packed.device) * 4
    u = (packed.to(torch.int64).t()[..., None] >> shifts) & 0xF
    return u.reshape(packed.shape[1], -1)[:, :in_features].to(torch.int16)


def check_storage(
    w: Tensor,
    w_scale: Tensor,
    w_zero_point: Tensor | None,
    w_bits: int,
    in_features: int,
    group_size: int,
) -> int:
    """Raise a ValueError unless ``(w, w_scale, w_zero_point)`` is a qcompile storage this module
    repacks (:mod:`qcompile.quant.packing`); returns the number of groups G."""
    if w_bits not in (4, 8):
        raise ValueError(f"repack_weight: w_bits must be 4 or 8, got {w_bits}")
    groups = num_groups(in_features, group_size)
    out = w.shape[0] if w.dim() else 0
    if w_scale.shape != (out, groups):
        raise ValueError(
            f"repack_weight: w_scale has shape {tuple(w_scale.shape)}, expected [out, G] = "
            f"[{out}, {groups}] for in_features {in_features}, group_size {group_size}"
        )
    if w_bits == 4:
        layout, zp_shape, zp_dtype = (
            "MatMulNBits' uint8 [out, G, g/2]",
            (out, math.ceil(groups / 2)),
            torch.uint8,
        )
        ok = w.dtype == torch.uint8 and w.dim() == 3 and w.shape[1] == groups and 2 * w.shape[2] >= group_size
    elif is_blocked_int8(w):
        layout, zp_shape, zp_dtype = "blocked uint8 [out, G, g]", (out, groups), torch.uint8
        ok = w.shape[1] == groups and w.shape[2] >= group_size
    else:
        layout, zp_shape, zp_dtype = f"int8 [out, {in_features}]", (out, groups), torch.int8
        ok = w.dtype == torch.int8 and w.dim() == 2 and w.shape[1] == in_features
    if not ok:
        raise ValueError(
            f"repack_weight: {w_bits}-bit storage must be {layout} with G = {groups}, got {w.dtype} {tuple(w.shape)}"
        )
    if w_zero_point is not None and (w_zero_point.dtype != zp_dtype or w_zero_point.shape != zp_shape):
        raise ValueError(
            f"repack_weight: the zero point of {layout} storage must be {zp_dtype} {list(zp_shape)}, got "
            f"{w_zero_point.dtype} {tuple(w_zero_point.shape)}"
        )
    return groups


def repack_weight(
    w: Tensor,
    w_scale: Tensor,
    w_zero_point: Tensor | None,
    w_bits: int,
    in_features: int,
    group_size: int,
) -> PackedWeight:
    """qcompile's storage of a ``qlinear_w`` weight (:mod:`qcompile.quant.packing`) -> the kernels'."""
    groups = check_storage(w, w_scale, w_zero_point, w_bits, in_features, group_size)
    zeros: Tensor | None = None
    if w_bits == 4:
        u = unpack_int4_weight(w, in_features).to(torch.int16) + INT4_OFFSET
        packed = pack_int4_words(u)
        if w_zero_point is not None:
            zeros = unpack_int4_zero_point(w_zero_point, groups).to(torch.int16) + INT4_OFFSET
    elif is_blocked_int8(w):
        packed = unpack_int8_blocked(w, in_features).t().contiguous()
        if w_zero_point is not None:
            zeros = w_zero_point.to(torch.int16) - UINT8_OFFSET
    else:
        packed = w.t().contiguous()
        zeros = w_zero_point
    if zeros is not None:
        zeros = zeros.to(torch.int8).t().contiguous()
    return PackedWeight(packed, w_scale.t().contiguous(), zeros, w_bits, in_features, group_size)


def unpack_weight(packed: PackedWeight) -> tuple[Tensor, Tensor]:
    """The signed ``(q, zero_point)`` int8 ``[N, K]`` / ``[N, G]`` a :class:`PackedWeight` stands for
    (what :func:`qcompile.quant.packing.weight_int8` gives on the original storage) — for tests."""
    groups = packed.scales.shape[0]
    if packed.w_bits == 4:
        q = unpack_int4_words(packed.w, packed.in_features) - INT4_OFFSET
        zp = (packed.zeros.t().to(torch.int16) - INT4_OFFSET) if packed.zeros is not None else None
    else:
        q, zp = packed.w.t(), (packed.zeros.t() if packed.zeros is not None else None)
    if zp is None:
        zp = torch.zeros(packed.out_features, groups, dtype=torch.int8, device=packed.w.device)
    return q.to(torch.int8).contiguous(), zp.to(torch.int8).contiguous()
