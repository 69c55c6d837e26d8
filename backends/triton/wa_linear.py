"""Integer-activation linears in Triton: ``qcompile::qlinear_wa`` (W8A8, W4A8, W4A4) and the fused
dynamic per-token activation quantization that usually precedes it.

What the kernels compute (``M`` tokens, ``K = in_features``, ``N`` outputs)::

    acc[m, n]  = Σ_k xq[m, k] · q[n, k]                      int8 × int8 → int32 (tl.dot)
    per channel:  y = x_scale[m] · w_scale[n] · (acc[m, n] − x_zp[m] · Σ_k q[n, k]) + bias[n]
    grouped:      y = x_scale[m] · Σ_blocks w_scale[n, g(block)] · (acc_block − x_zp[m] · Σ_block q[n, k])

which is ``linear((xq − x_zp) · x_scale, (q · w_scale), bias)`` — the registry op's reference — up to
float rounding: the integer part is exact; only the final fp32 scaling (and, for groups, the fp32 sum
of per-block partial results) rounds. Why the zero point is a correction term and not subtracted
from ``xq``: ``xq − x_zp`` spans [−255, 255] and no longer fits the int8 MMA operand. Per channel the
column sums ``Σ_k q[n, k]`` are precomputed once at prepare time (``w_colsum``, int32) and applied in
the epilogue; with groups the scale changes per block, so the block's column sum is reduced in the
kernel (only in that rare combination: asymmetric activations *and* grouped weights; QQQ's W4A8 has
symmetric activations). Every term is int32 and exact: ``|acc| ≤ 2 · 128 · 128 · K < 2³¹`` for K
below 65536 (``supports`` refuses larger K).

Group scales (QQQ's W4A8 g = 128) are applied per K block inside the loop in fp32: each block's
int32 partial product is scaled by its group's ``w_scale`` and accumulated in fp32. A block must not
straddle two groups, so the K tile divides the group size (the autotuner prunes the rest; group
sizes must be multiples of 32, the smallest K tile an int8 MMA takes). Per channel, the whole K loop
accumulates in int32 and the scales are applied once in the epilogue.

Weight layouts (``prepare`` makes them once, at lowering):

- ``w_bits = 8``: int8 ``[N, K]`` as ``nn.Linear`` stores it (K contiguous). The kernel loads
  ``[BLOCK_K, BLOCK_N]`` tiles of it transposed: the B operand of an int8 MMA must be K-major on
  Hopper (wgmma), which this is.
- ``w_bits = 4``: uint8 ``[N, ceil(K / 2)]``, two int4 values per byte *along K*, offset-binary
  ``u = q + 8``, element ``2j`` in the low nibble and ``2j + 1`` in the high one. This is exactly the
  MatMulNBits layout ``fold_qdq`` already produces (``[N, G, g / 2]`` read as ``[N, G·g / 2]``: each
  group starts on a byte because g is even, and the ragged last group's padding is q = 0), so a
  4-bit weight is shared with the ONNX backend untouched; an int4-valued weight held in int8
  (per-channel int4, QuaRot's W4A4, or a group size MatMulNBits cannot take) is packed the same way.
  Why packed and not int8 holding int4 values: decoding (M ≤ 16) is bound by weight bytes, and
  packing halves them. Why unpack in registers to int8: there is no int4 MMA on Hopper, so the dot
  is int8 either way; the unpack is two shifts / masks and an interleave (``tl.join`` + reshape).

Activations are int8 (``qmin``/``qmax`` −128/127 for A8, −8/7 for A4: int4 values held in int8; they
are quantized per row, in registers, and never packed).

Fused dynamic quantization (``dyn_quant_linear``): each program first reads its ``BLOCK_M`` rows of
the float activation once to find their absmax (or min/max), then quantizes every ``[BLOCK_M,
BLOCK_K]`` tile in registers right before the dot — one launch, and the int8 activation never goes
through memory. The price is that every N tile re-reads (from L2) and re-quantizes its rows: free
when decoding (x is tiny next to W), a few percent of the int8 MMA time at large M. The quantizer
reproduces :func:`qcompile.quant.rtn.choose_qparams_per_token_ref` + ``quantize_ref`` bit for bit:
fp32 ``absmax / ((qmax − qmin) / 2)`` (asymmetric: ``(max(x_max, 0) − min(x_min, 0)) / (qmax − qmin)``,
``zp = clamp(qmin − round(min / scale))``), rounded to x's dtype (then 0 → 1), then
``clamp(round(x / scale) + zp, qmin, qmax)`` with IEEE division (``tl.math.div_rn``: plain ``/``
is an approximate division on NVIDIA GPUs) and round-half-to-even (``torch.round``). The rounding
is the fp32 magic-number add/subtract (exact for |v| < 2²²), and bf16 rounding is done on the bits,
because the interpreter has no ``rint`` and truncates fp32 → bf16 casts; both spellings are exact
on the GPU too.

Ops (``torch.library.triton_op``, so Inductor sees the kernels; each has a fake)::

    qcompile_triton::qlinear_wa(Tensor xq, Tensor x_scale, Tensor? x_zero_point, Tensor w,
        Tensor w_scale, Tensor? w_colsum, Tensor? bias, int w_bits, int in_features,
        int group_size) -> Tensor
    qcompile_triton::quantize_per_token(Tensor x, int qmin, int qmax, bool symmetric)
        -> (Tensor xq, Tensor scale, Tensor zero_point)
    qcompile_triton::dyn_quant_linear(Tensor x, int qmin, int qmax, bool symmetric, Tensor w,
        Tensor w_scale, Tensor? w_colsum, Tensor? bias, int w_bits, int in_features,
        int group_size) -> Tensor

``w`` / ``w_scale`` (fp32 ``[N, G]``) / ``w_colsum`` (int32 ``[N]``, per-channel weights with
activation zero points only, else None) are in the kernel layout made by :func:`prepare_weight`;
``x_scale`` / ``x_zero_point`` are per token ``[..., 1]`` or per tensor (one element), as the
registry op takes them; the output has ``x_scale``'s dtype (``dyn_quant_linear``: x's).
``quantize_per_token`` equals ``qcompile::choose_qparams_per_token`` followed by
``qcompile::quantize`` (scale and zero point ``[..., 1]``).

Registration: ``register_impl("triton", "qlinear_wa", QLINEAR_WA_IMPL)``. A lowering pass that sees
``s, z = choose_qparams_per_token(x, qmin, qmax, sym); xq = quantize(x, s, z, qmin, qmax, 0);
y = qlinear_wa(xq, s, z or None, …)`` can put one ``dyn_quant_linear`` in place of the three with
:data:`DYN_QUANT_LINEAR_IMPL`: its ``prepare`` / ``supports`` take the ``qlinear_wa`` argument dict
with ``xq, x_scale, x_zero_point`` replaced by ``x, qmin, qmax, symmetric``. (When several linears
read one quantized activation — q, k, v — each fused call re-quantizes it; that is cheap, but the
pass may prefer ``quantize_per_token`` once plus ``qlinear_wa`` per linear.)

Unsupported (``supports`` says why, and the call keeps the reference): asymmetric weights
(``w_zero_point``), group sizes that are not multiples of 32, the blocked uint8 layout (weight-only
storage), K ≥ 65536, devices other than CUDA (CPU tensors only under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

import qcompile.ops  # noqa: F401  (defines qcompile::qlinear_wa, which register_impl looks up)
from qcompile.ops.registry import KernelImpl, register_impl
from qcompile.quant.packing import INT4_OFFSET, is_blocked_int8, unpack_int4_weight

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_K = 65535  # 2 · 128 · 128 · K must stay below 2³¹ (int32 accumulator with the zp correction)
MIN_GROUP = 32  # the smallest K tile of an int8 MMA; a group holds whole tiles

# ---- autotune configs ------------------------------------------------------------------------------


def _gemm_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


if INTERPRET:  # the interpreter runs every program in numpy: the first config that fits, no tuning
    _GEMM_CONFIGS = [_gemm_config(16, 64, 64, 1, 1), _gemm_config(16, 64, 32, 1, 1)]
    _QUANT_CONFIGS = [triton.Config({"BLOCK_M": 4, "BLOCK_K": 64}, num_warps=1)]
else:
    _GEMM_CONFIGS = [
        # decode (M ≤ 32): narrow M tiles, deep K, many programs over N (N / 32 = 128 programs for
        # N = 4096: about one per SM of an H100/H200, where a weight-bound GEMV wants them all)
        _gemm_config(16, 32, 256, 4, 3),
        _gemm_config(16, 32, 128, 4, 4),
        _gemm_config(16, 64, 128, 4, 4),
        _gemm_config(16, 128, 128, 4, 4),
        _gemm_config(16, 64, 256, 4, 3),
        _gemm_config(32, 64, 128, 4, 4),
        _gemm_config(16, 64, 64, 4, 5),
        # prefill
        _gemm_config(64, 128, 128, 4, 3),
        _gemm_config(64, 128, 64, 4, 4),
        _gemm_config(128, 128, 128, 8, 3),
        _gemm_config(128, 256, 64, 8, 3),
        _gemm_config(128, 128, 64, 4, 4),
        # fallbacks any group size (a multiple of 32) takes
        _gemm_config(16, 64, 32, 4, 4),
        _gemm_config(64, 128, 32, 4, 4),
    ]
    _QUANT_CONFIGS = [
        triton.Config({"BLOCK_M": 1, "BLOCK_K": 1024}, num_warps=4),
        triton.Config({"BLOCK_M": 1, "BLOCK_K": 2048}, num_warps=8),
        triton.Config({"BLOCK_M": 1, "BLOCK_K": 4096}, num_warps=8),
        triton.Config({"BLOCK_M": 4, "BLOCK_K": 1024}, num_warps=8),
    ]


def _prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
    """Keep the configs whose K tile fits inside one weight group, and whose M tile is not much
    larger than the problem's (a 128-row tile for one token wastes the launch)."""
    group, k, m_bucket = named_args["GROUP_SIZE"], named_args["K"], named_args["M_BUCKET"]
    kept = [
        c
        for c in configs
        if (group == k or group % c.kwargs["BLOCK_K"] == 0) and c.kwargs["BLOCK_M"] <= max(16, 2 * m_bucket)
    ]
    kept = kept or [c for c in configs if group % c.kwargs["BLOCK_K"] == 0]
    return kept[:1] if INTERPRET else kept  # one config left: the autotuner runs it without timing


def _m_bucket(m: int) -> int:
    """The autotuner's M key: powers of two up to 256, so decode steps and prefills of every length
    do not each trigger a tuning run. A symbolic M (torch.compile, dynamic batch) is passed as is:
    bucketing it would guard on its value, and the kernel is then keyed on M itself."""
    if isinstance(m, torch.SymInt):
        return m
    return min(triton.next_power_of_2(max(m, 1)), 256)


# ---- device helpers ----------------------------------------------------------------------------------


@triton.jit
def _round_to_dtype(v, DTYPE: tl.constexpr):
    """fp32 ``v`` rounded (to nearest even) to ``DTYPE``'s precision, kept in fp32. bf16 on the bits:
    the interpreter truncates fp32 → bf16 casts."""
    if DTYPE == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        v = b.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _round_half_even(v):
    """``torch.round`` in fp32: adding 1.5·2²³ leaves no fraction bits, so the FPU's round-to-nearest-
    even does the rounding (exact for |v| < 2²²; larger values are clamped first, which changes no
    int8 result)."""
    v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _row_qparams(
    x_ptr,
    offs_m,
    M,
    K,
    stride_xm,
    HALF_RANGE,
    RANGE,
    QMIN,
    QMAX,
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per-row fp32 scale (a value of x's dtype) and fp32 zero point of ``BLOCK_M`` rows, exactly as
    ``choose_qparams_per_token_ref`` (module docstring)."""
    m_mask = offs_m < M
    lo = tl.zeros((BLOCK_M,), dtype=tl.float32)
    hi = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if SYMMETRIC:
            hi = tl.maximum(hi, tl.max(tl.abs(x), axis=1))
        else:  # the padding's 0 is harmless: the range is widened to contain 0 anyway
            lo = tl.minimum(lo, tl.min(x, axis=1))
            hi = tl.maximum(hi, tl.max(x, axis=1))
    if SYMMETRIC:
        scale = tl.math.div_rn(hi, tl.full((BLOCK_M,), HALF_RANGE, tl.float32))
    else:
        scale = tl.math.div_rn(hi - lo, tl.full((BLOCK_M,), RANGE, tl.float32))
    scale = _round_to_dtype(scale, x_ptr.dtype.element_ty)
    scale = tl.where(scale > 0, scale, 1.0)
    if SYMMETRIC:
        zp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        zp = QMIN - _round_half_even(tl.math.div_rn(lo, scale))
        zp = tl.minimum(tl.maximum(zp, QMIN), QMAX)
    return scale, zp


@triton.jit
def _quantize_tile(x, scale, zp, QMIN, QMAX):
    """``clamp(round(x / scale) + zp, qmin, qmax)`` as int8; ``scale`` / ``zp`` broadcast against x."""
    q = _round_half_even(tl.math.div_rn(x, scale)) + zp
    return tl.minimum(tl.maximum(q, QMIN), QMAX).to(tl.int8)


@triton.jit
def _load_weight_tile(w_ptr, offs_n, n_mask, k0, K, KW, stride_wn, W4: tl.constexpr, BLOCK_K: tl.constexpr):
    """The int8 ``[BLOCK_K, BLOCK_N]`` tile ``q[n, k0:k0 + BLOCK_K]ᵀ`` (K beyond the weight reads 0)."""
    if W4:  # two values per byte along K, low nibble first, u = q + 8
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = n_mask[:, None] & (offs_b < KW)[None, :]
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :], mask=mask, other=0x88)
        lo = (b & 0xF).to(tl.int8) - 8
        hi = (b >> 4).to(tl.int8) - 8
        w = tl.trans(tl.reshape(tl.join(lo, hi), (lo.shape[0], BLOCK_K)))  # [n, j, 2] → [n, 2j + t]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & n_mask[None, :]
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=mask, other=0)
    return w


# ---- the GEMM kernel ---------------------------------------------------------------------------------


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "GROUP_SIZE", "W4", "FUSE_QUANT", "SYMMETRIC", "HAS_XZP"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)
@triton.jit
def _wa_gemm_kernel(
    a_ptr,  # int8 xq [M, K]; with FUSE_QUANT the float x [M, K]
    xs_ptr,  # activation scale per row (stride_xs 1) or per tensor (0); unused with FUSE_QUANT
    xz_ptr,  # int8 activation zero point, same strides; read only with HAS_XZP and not FUSE_QUANT
    w_ptr,  # int8 [N, K], or uint8 [N, KW] nibbles (W4)
    ws_ptr,  # fp32 [N, G] weight scales
    wcs_ptr,  # int32 [N] Σ_k q[n, k] (per channel with HAS_XZP)
    b_ptr,  # bias [N] (HAS_BIAS)
    out_ptr,  # [M, N] in the output dtype; int32 with INT_OUT
    M,
    N,
    K,
    KW,  # bytes per weight row (W4) or K
    M_BUCKET,  # autotune key only
    GROUP_SIZE,  # K for per-channel weights
    stride_am,
    stride_xs,
    stride_wn,
    stride_wsn,
    stride_om,
    HALF_RANGE,
    RANGE,
    QMIN,
    QMAX,
    W4: tl.constexpr,
    GROUPED: tl.constexpr,
    HAS_XZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSE_QUANT: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    INT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order (Triton matmul tutorial): GROUP_M row tiles share each weight tile in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    if FUSE_QUANT:
        xs, xz = _row_qparams(
            a_ptr, offs_m, M, K, stride_am, HALF_RANGE, RANGE, QMIN, QMAX, SYMMETRIC, BLOCK_M, BLOCK_K
        )
        xz_i = xz.to(tl.int32)
    else:
        xs = tl.load(xs_ptr + offs_m * stride_xs, mask=m_mask, other=1.0).to(tl.float32)
        if HAS_XZP:
            xz_i = tl.load(xz_ptr + offs_m * stride_xs, mask=m_mask, other=0).to(tl.int32)

    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a_mask = m_mask[:, None] & k_mask[None, :]
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
        if FUSE_QUANT:
            x = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            a = _quantize_tile(x, xs[:, None], xz[:, None], QMIN, QMAX)
            a = tl.where(a_mask, a, 0)  # x = 0 quantizes to zp, not 0: padding must add nothing
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0)
        w = _load_weight_tile(w_ptr, offs_n, n_mask, k0, K, KW, stride_wn, W4, BLOCK_K)
        if GROUPED:  # the tile lies in one group (BLOCK_K divides GROUP_SIZE): scale it, in fp32
            part = tl.dot(a, w, out_dtype=tl.int32)
            if HAS_XZP:
                w_sum = tl.sum(tl.where(k_mask[:, None], w, 0).to(tl.int32), axis=0)
                part -= xz_i[:, None] * w_sum[None, :]
            s = tl.load(ws_ptr + offs_n * stride_wsn + k0 // GROUP_SIZE, mask=n_mask, other=0.0)
            acc_f += part.to(tl.float32) * s[None, :]
        else:
            acc_i = tl.dot(a, w, acc=acc_i, out_dtype=tl.int32)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if INT_OUT:
        tl.store(out_ptrs, acc_i, mask=out_mask)
    else:
        if not GROUPED:
            if HAS_XZP:
                acc_i -= xz_i[:, None] * tl.load(wcs_ptr + offs_n, mask=n_mask, other=0)[None, :]
            acc_f = (
                acc_i.to(tl.float32) * tl.load(ws_ptr + offs_n * stride_wsn, mask=n_mask, other=0.0)[None, :]
            )
        y = acc_f * xs[:, None]
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y = _round_to_dtype(y, out_ptr.dtype.element_ty)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


# ---- the row quantizer -------------------------------------------------------------------------------


@triton.autotune(configs=_QUANT_CONFIGS, key=["K", "SYMMETRIC"])
@triton.jit
def _quant_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    HALF_RANGE,
    RANGE,
    QMIN,
    QMAX,
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``choose_qparams_per_token`` + ``quantize`` for ``BLOCK_M`` rows: one pass for the range, one
    to quantize (the second re-reads the rows from L2)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    scale, zp = _row_qparams(
        x_ptr, offs_m, M, K, stride_xm, HALF_RANGE, RANGE, QMIN, QMAX, SYMMETRIC, BLOCK_M, BLOCK_K
    )
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        q = _quantize_tile(x.to(tl.float32), scale[:, None], zp[:, None], QMIN, QMAX)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + offs_m, scale.to(s_ptr.dtype.element_ty), mask=m_mask)
    tl.store(z_ptr + offs_m, zp.to(tl.int8), mask=m_mask)


# ---- launch wrappers -----------------------------------------------------------------------------------


def _fail(kernel: str, problem: str) -> ValueError:
    return ValueError(f"qcompile_triton::{kernel}: {problem}")


def _check_device(kernel: str, tensors: dict[str, Tensor | None]) -> torch.device:
    """Every tensor on one device, and a device Triton runs on (CPU only under the interpreter)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        where = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise _fail(kernel, f"tensors are on different devices ({where})")
    if first.type != "cuda" and not (INTERPRET and first.type == "cpu"):
        raise _fail(kernel, f"tensors are on {first}; Triton runs on CUDA (CPU only with TRITON_INTERPRET=1)")
    return first


def _check_weight(kernel: str, w: Tensor, w_scale: Tensor, w_bits: int, k: int, group_size: int) -> int:
    """Validates the prepared weight (:func:`prepare_weight`'s layout); returns N."""
    if w_bits not in (4, 8):
        raise _fail(kernel, f"w_bits must be 4 (nibbles) or 8 (int8), got {w_bits}")
    want = (torch.uint8, (k + 1) // 2) if w_bits == 4 else (torch.int8, k)
    if w.dim() != 2 or w.dtype != want[0] or w.shape[1] < want[1]:
        raise _fail(
            kernel,
            f"w for w_bits={w_bits} must be {want[0]} [N, ≥{want[1]}] (prepare_weight's layout) for "
            f"in_features={k}, got {w.dtype} {list(w.shape)}",
        )
    groups = 1 if group_size == 0 else -(-k // group_size)
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (w.shape[0], groups):
        raise _fail(
            kernel,
            f"w_scale must be float32 [N={w.shape[0]}, G={groups}] (group_size={group_size}, "
            f"in_features={k}), got {w_scale.dtype} {list(w_scale.shape)}",
        )
    if group_size < 0 or (group_size > 0 and group_size % MIN_GROUP):
        raise _fail(kernel, f"group_size must be 0 or a multiple of {MIN_GROUP}, got {group_size}")
    if not 0 < k <= MAX_K:
        raise _fail(kernel, f"in_features={k} outside 1..{MAX_K} (the int32 accumulator could overflow)")
    return int(w.shape[0])


def _check_bias_colsum(kernel: str, bias: Tensor | None, w_colsum: Tensor | None, n: int) -> None:
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.dtype.is_floating_point):
        raise _fail(kernel, f"bias must be a float [N={n}], got {bias.dtype} {list(bias.shape)}")
    if w_colsum is not None and (tuple(w_colsum.shape) != (n,) or w_colsum.dtype != torch.int32):
        raise _fail(kernel, f"w_colsum must be int32 [N={n}], got {w_colsum.dtype} {list(w_colsum.shape)}")


def _per_row(kernel: str, name: str, t: Tensor, lead: tuple[int, ...]) -> int:
    """The row stride of a per-token ``[..., 1]`` (1) or per-tensor one-element (0) parameter."""
    if t.numel() == 1:
        return 0
    if tuple(t.shape) != (*lead, 1):
        raise _fail(
            kernel, f"{name} must be per token {[*lead, 1]} or per tensor (one element), got {list(t.shape)}"
        )
    return 1


def _launch_gemm(
    a: Tensor,
    xs: Tensor,
    xz: Tensor | None,
    stride_xs: int,
    w: Tensor,
    w_scale: Tensor,
    w_colsum: Tensor | None,
    bias: Tensor | None,
    out: Tensor,
    w_bits: int,
    k: int,
    group_size: int,
    qrange: tuple[int, int] = (-128, 127),
    fuse_quant: bool = False,
    symmetric: bool = True,
    int_out: bool = False,
) -> None:
    m, n = a.shape[0], w.shape[0]
    if m == 0 or n == 0:  # an empty batch: nothing to launch (a zero-sized grid is an error)
        return
    grouped = group_size > 0
    has_xzp = (not symmetric) if fuse_quant else xz is not None
    qmin, qmax = qrange

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    torch.library.wrap_triton(_wa_gemm_kernel)[grid](
        a,
        xs,
        xz if xz is not None else xs,
        w,
        w_scale,
        w_colsum if w_colsum is not None else w_scale,
        bias if bias is not None else w_scale,
        out,
        m,
        n,
        k,
        w.shape[1],
        _m_bucket(m),
        group_size if grouped else k,
        a.stride(0),
        stride_xs,
        w.stride(0),
        w_scale.stride(0),
        out.stride(0),
        (qmax - qmin) / 2,
        float(qmax - qmin),
        qmin,
        qmax,
        W4=w_bits == 4,
        GROUPED=grouped,
        HAS_XZP=has_xzp,
        HAS_BIAS=bias is not None,
        FUSE_QUANT=fuse_quant,
        SYMMETRIC=symmetric,
        INT_OUT=int_out,
    )


def _rows(kernel: str, name: str, t: Tensor, k: int) -> Tensor:
    """``t [..., K]`` as a row-major ``[M, K]`` view (a copy only when the last dim is strided)."""
    if t.dim() < 1 or t.shape[-1] != k:
        raise _fail(kernel, f"{name} must be [..., in_features={k}], got {list(t.shape)}")
    t2 = t.reshape(-1, k)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check_grid(kernel: str, qmin: int, qmax: int) -> None:
    if not -128 <= qmin < 0 < qmax <= 127:
        raise _fail(
            kernel, f"qmin/qmax must be a signed int8 grid (-128 ≤ qmin < 0 < qmax ≤ 127), got {qmin}/{qmax}"
        )


# ---- torch ops -------------------------------------------------------------------------------------------


@torch.library.triton_op("qcompile_triton::qlinear_wa", mutates_args=())
def qlinear_wa(
    xq: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor | None,
    w: Tensor,
    w_scale: Tensor,
    w_colsum: Tensor | None,
    bias: Tensor | None,
    w_bits: int,
    in_features: int,
    group_size: int,
) -> Tensor:
    """``qcompile::qlinear_wa`` on int8 activations and a :func:`prepare_weight` weight."""
    kernel = "qlinear_wa"
    _check_device(kernel, {"xq": xq, "x_scale": x_scale, "x_zero_point": x_zero_point, "w": w, "bias": bias})
    n = _check_weight(kernel, w, w_scale, w_bits, in_features, group_size)
    _check_bias_colsum(kernel, bias, w_colsum, n)
    if xq.dtype != torch.int8:
        raise _fail(kernel, f"xq must be int8, got {xq.dtype}")
    if not x_scale.dtype.is_floating_point:
        raise _fail(kernel, f"x_scale must be a float tensor, got {x_scale.dtype}")
    a = _rows(kernel, "xq", xq, in_features)
    lead = tuple(xq.shape[:-1])
    stride_xs = _per_row(kernel, "x_scale", x_scale, lead)
    xz = None
    if x_zero_point is not None:
        if (
            x_zero_point.dtype != torch.int8
            or _per_row(kernel, "x_zero_point", x_zero_point, lead) != stride_xs
        ):
            raise _fail(
                kernel,
                f"x_zero_point must be int8 shaped like x_scale {list(x_scale.shape)}, got "
                f"{x_zero_point.dtype} {list(x_zero_point.shape)}",
            )
        xz = x_zero_point.reshape(-1)
    if x_zero_point is not None and group_size == 0 and w_colsum is None:
        raise _fail(
            kernel, "per-channel weights with an activation zero point need w_colsum (prepare_weight)"
        )
    out = torch.empty((a.shape[0], n), dtype=x_scale.dtype, device=xq.device)
    _launch_gemm(
        a,
        x_scale.reshape(-1),
        xz,
        stride_xs,
        w,
        w_scale,
        w_colsum,
        bias,
        out,
        w_bits,
        in_features,
        group_size,
    )
    return out.reshape(*lead, n)


@qlinear_wa.register_fake
def _qlinear_wa_fake(xq, x_scale, x_zero_point, w, w_scale, w_colsum, bias, w_bits, in_features, group_size):
    return xq.new_empty((*xq.shape[:-1], w.shape[0]), dtype=x_scale.dtype)


@torch.library.triton_op("qcompile_triton::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``choose_qparams_per_token`` + ``quantize``: (xq int8 [..., K], scale [..., 1] in x's dtype, zero
    point int8 [..., 1]), bit for bit."""
    kernel = "quantize_per_token"
    _check_device(kernel, {"x": x})
    _check_grid(kernel, qmin, qmax)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() < 1 or x.shape[-1] == 0:
        raise _fail(kernel, f"x must be float32/float16/bfloat16 [..., K > 0], got {x.dtype} {list(x.shape)}")
    k = x.shape[-1]
    x2 = _rows(kernel, "x", x, k)
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=x.dtype, device=x.device)
    zp = torch.empty((m,), dtype=torch.int8, device=x.device)

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    if m > 0:
        torch.library.wrap_triton(_quant_rows_kernel)[grid](
            x2,
            q,
            scale,
            zp,
            m,
            k,
            x2.stride(0),
            q.stride(0),
            (qmax - qmin) / 2,
            float(qmax - qmin),
            qmin,
            qmax,
            SYMMETRIC=symmetric,
        )
    lead = tuple(x.shape[:-1])
    return q.reshape(*lead, k), scale.reshape(*lead, 1), zp.reshape(*lead, 1)


@quantize_per_token.register_fake
def _quantize_per_token_fake(x, qmin, qmax, symmetric):
    one = (*x.shape[:-1], 1)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(one), x.new_empty(one, dtype=torch.int8)


@torch.library.triton_op("qcompile_triton::dyn_quant_linear", mutates_args=())
def dyn_quant_linear(
    x: Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    w: Tensor,
    w_scale: Tensor,
    w_colsum: Tensor | None,
    bias: Tensor | None,
    w_bits: int,
    in_features: int,
    group_size: int,
) -> Tensor:
    """Dynamic per-token quantization of x fused with the integer GEMM: one launch for
    ``choose_qparams_per_token → quantize → qlinear_wa``."""
    kernel = "dyn_quant_linear"
    _check_device(kernel, {"x": x, "w": w, "bias": bias})
    n = _check_weight(kernel, w, w_scale, w_bits, in_features, group_size)
    _check_bias_colsum(kernel, bias, w_colsum, n)
    _check_grid(kernel, qmin, qmax)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise _fail(kernel, f"x must be float32/float16/bfloat16, got {x.dtype}")
    if not symmetric and group_size == 0 and w_colsum is None:
        raise _fail(kernel, "asymmetric activations with per-channel weights need w_colsum (prepare_weight)")
    a = _rows(kernel, "x", x, in_features)
    out = torch.empty((a.shape[0], n), dtype=x.dtype, device=x.device)
    _launch_gemm(
        a,
        a,
        None,
        0,
        w,
        w_scale,
        w_colsum,
        bias,
        out,
        w_bits,
        in_features,
        group_size,
        qrange=(qmin, qmax),
        fuse_quant=True,
        symmetric=symmetric,
    )
    return out.reshape(*x.shape[:-1], n)


@dyn_quant_linear.register_fake
def _dyn_quant_linear_fake(
    x, qmin, qmax, symmetric, w, w_scale, w_colsum, bias, w_bits, in_features, group_size
):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def int_mm(xq: Tensor, w: Tensor, w_bits: int, in_features: int) -> Tensor:
    """The kernel's raw int32 accumulator ``xq @ qᵀ`` ``[M, N]`` (per-channel path, no scales): for
    tests and debugging, the integer half of ``qlinear_wa`` on its own."""
    kernel = "int_mm"
    _check_device(kernel, {"xq": xq, "w": w})
    dummy_scale = torch.ones((w.shape[0], 1), dtype=torch.float32, device=w.device)
    n = _check_weight(kernel, w, dummy_scale, w_bits, in_features, 0)
    if xq.dtype != torch.int8 or xq.dim() != 2:
        raise _fail(kernel, f"xq must be int8 [M, K], got {xq.dtype} {list(xq.shape)}")
    a = _rows(kernel, "xq", xq, in_features)
    out = torch.empty((a.shape[0], n), dtype=torch.int32, device=xq.device)
    ones = torch.ones((1,), dtype=torch.float32, device=xq.device)
    _launch_gemm(a, ones, None, 0, w, dummy_scale, None, None, out, w_bits, in_features, 0, int_out=True)
    return out


# ---- lowering: prepare / supports ------------------------------------------------------------------------


def pack_nibbles(q: Tensor) -> Tensor:
    """int8 ``q [N, K]`` with values in [-8, 7] → uint8 ``[N, ceil(K / 2)]`` of ``u = q + 8``, element
    2j in the low nibble (the kernel's 4-bit layout; an odd K is padded with q = 0)."""
    u = q.to(torch.int16) + INT4_OFFSET
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=INT4_OFFSET)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8).contiguous()


def _fits_int4(q: Tensor) -> bool:
    return bool(q.numel()) and int(q.min()) >= -8 and int(q.max()) <= 7


def prepare_weight(
    w: Tensor, w_scale: Tensor, w_bits: int, in_features: int, group_size: int, need_colsum: bool
) -> dict[str, Any]:
    """The registry op's weight (:mod:`qcompile.quant.packing`) in the kernel's layout:
    ``{w, w_scale, w_colsum, w_bits}``. MatMulNBits int4 is read as is (``[N, G·g / 2]``); int8 whose
    values fit int4 is packed to nibbles; other int8 stays. ``w_colsum`` (int32 ``[N]``) only for
    per-channel weights under activation zero points (``need_colsum``)."""
    n = w.shape[0]
    if w_bits == 4:
        packed, bits = w.reshape(n, -1).contiguous(), 4
        q = None
    elif _fits_int4(w):
        packed, bits, q = pack_nibbles(w), 4, w
    else:
        packed, bits, q = w.contiguous(), 8, w
    colsum = None
    if need_colsum and group_size == 0:
        if q is None:
            q = unpack_int4_weight(w, in_features)
        colsum = q.to(torch.int32).sum(dim=1, dtype=torch.int32).contiguous()
    return {
        "w": packed,
        "w_scale": w_scale.to(torch.float32).contiguous(),
        "w_colsum": colsum,
        "w_bits": bits,
    }


def _shape(v: Any) -> tuple[int, ...] | None:
    """Shape of a constant tensor or of an fx node's ``meta["val"]`` (None when unknown)."""
    if isinstance(v, Tensor):
        return tuple(v.shape)
    val = getattr(v, "meta", {}).get("val")
    return tuple(val.shape) if isinstance(val, Tensor) else None


def _weight_unsupported(args: dict[str, Any], device: torch.device) -> str | None:
    """The reason this backend cannot take the call's weight (or device); None when it can."""
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        return f"Triton kernels run on CUDA devices (CPU only under TRITON_INTERPRET=1), not {device}"
    if args["w_zero_point"] is not None:
        return "asymmetric weights (w_zero_point) are not implemented: the kernels assume symmetric weights"
    bits, w, g, k = args["w_bits"], args["w"], args["group_size"], args["in_features"]
    if bits not in (4, 8):
        return f"w_bits={bits}: the kernels take 4- or 8-bit weights"
    if bits == 8 and is_blocked_int8(w):
        return "the blocked uint8 8-bit layout is weight-only storage (qlinear_w), not an int8 GEMM operand"
    if g > 0 and g % MIN_GROUP:
        return f"group size {g} is not a multiple of {MIN_GROUP}: a K tile of an int8 MMA would straddle two groups"
    if k > MAX_K:
        return f"in_features={k} > {MAX_K}: the int32 accumulator could overflow"
    return None


def supports_qlinear_wa(args: dict[str, Any], device: torch.device) -> str | None:
    """``KernelImpl.supports`` of ``qlinear_wa``: None, or why the Triton kernel does not take it."""
    reason = _weight_unsupported(args, device)
    if reason is not None:
        return reason
    shape = _shape(args["x_scale"])
    if shape is not None and shape and shape[-1] != 1 and int(torch.Size(shape).numel()) != 1:
        return f"x_scale {list(shape)} is neither per token [..., 1] nor per tensor"
    return None


def prepare_qlinear_wa(args: dict[str, Any]) -> dict[str, Any]:
    """``KernelImpl.prepare`` of ``qlinear_wa``: the weight into the kernel layout, runtime inputs
    (``xq``, ``x_scale``, ``x_zero_point``) and the bias passed through."""
    weight = prepare_weight(
        args["w"],
        args["w_scale"],
        args["w_bits"],
        args["in_features"],
        args["group_size"],
        need_colsum=args["x_zero_point"] is not None,
    )
    return {
        "xq": args["xq"],
        "x_scale": args["x_scale"],
        "x_zero_point": args["x_zero_point"],
        **weight,
        "bias": args["bias"],
        "in_features": args["in_features"],
        "group_size": args["group_size"],
    }


def supports_dyn_quant_linear(args: dict[str, Any], device: torch.device) -> str | None:
    """``supports`` of the fused op: ``qlinear_wa``'s argument dict with ``x, qmin, qmax, symmetric``
    in place of ``xq, x_scale, x_zero_point``."""
    reason = _weight_unsupported(args, device)
    if reason is not None:
        return reason
    if not -128 <= args["qmin"] < 0 < args["qmax"] <= 127:
        return f"activation grid [{args['qmin']}, {args['qmax']}] is not a signed int8 grid around 0"
    return None


def prepare_dyn_quant_linear(args: dict[str, Any]) -> dict[str, Any]:
    """``prepare`` of the fused op (argument dict as :func:`supports_dyn_quant_linear`)."""
    weight = prepare_weight(
        args["w"],
        args["w_scale"],
        args["w_bits"],
        args["in_features"],
        args["group_size"],
        need_colsum=not args["symmetric"],
    )
    return {
        "x": args["x"],
        "qmin": args["qmin"],
        "qmax": args["qmax"],
        "symmetric": args["symmetric"],
        **weight,
        "bias": args["bias"],
        "in_features": args["in_features"],
        "group_size": args["group_size"],
    }


QLINEAR_WA = torch.ops.qcompile_triton.qlinear_wa.default
QUANTIZE_PER_TOKEN = torch.ops.qcompile_triton.quantize_per_token.default
DYN_QUANT_LINEAR = torch.ops.qcompile_triton.dyn_quant_linear.default

QLINEAR_WA_IMPL = KernelImpl(op=QLINEAR_WA, prepare=prepare_qlinear_wa, supports=supports_qlinear_wa)
DYN_QUANT_LINEAR_IMPL = KernelImpl(
    op=DYN_QUANT_LINEAR, prepare=prepare_dyn_quant_linear, supports=supports_dyn_quant_linear
)
register_impl("triton", "qlinear_wa", QLINEAR_WA_IMPL)
