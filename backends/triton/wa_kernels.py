"""The Triton kernels behind :mod:`qcompile.backends.triton.wa_linear` (ops, layouts, registration
live there): one integer GEMM kernel for W8A8 / W4A8 / W4A4, optionally with the dynamic per-token
activation quantization fused in front of it, and a row quantizer.

What the GEMM computes (``M`` tokens, ``K = in_features``, ``N`` outputs)::

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
below 65536 (``MAX_K``).

Group scales (QQQ's W4A8 g = 128) are applied per K block inside the loop in fp32: each block's
int32 partial product is scaled by its group's ``w_scale`` and accumulated in fp32. A block must not
straddle two groups, so the K tile divides the group size (the autotuner prunes the rest; group
sizes must be multiples of 32, the smallest K tile an int8 MMA takes). Per channel, the whole K loop
accumulates in int32 and the scales are applied once in the epilogue.

Fused dynamic quantization (``FUSE_QUANT``): each program first reads its ``BLOCK_M`` rows of the
float activation once to find their absmax (or min/max), then quantizes every ``[BLOCK_M, BLOCK_K]``
tile in registers right before the dot — one launch, and the int8 activation never goes through
memory. The price is that every N tile re-reads (from L2) and re-quantizes its rows: free when
decoding (x is tiny next to W), a few percent of the int8 MMA time at large M. The quantizer
reproduces :func:`qcompile.quant.rtn.choose_qparams_per_token_ref` + ``quantize_ref`` bit for bit:
fp32 ``absmax / ((qmax − qmin) / 2)`` (asymmetric: ``(max(x_max, 0) − min(x_min, 0)) / (qmax − qmin)``,
``zp = clamp(qmin − round(min / scale))``), rounded to x's dtype (then 0 → 1), then
``clamp(round(x / scale) + zp, qmin, qmax)`` with IEEE division (``tl.math.div_rn``: plain ``/``
is an approximate division on NVIDIA GPUs) and round-half-to-even (``torch.round``). The rounding
is the fp32 magic-number add/subtract (exact for |v| < 2²²), and bf16 rounding is done on the bits,
because the interpreter has no ``rint`` and truncates fp32 → bf16 casts; both spellings are exact
on the GPU too, and neither contains a multiply-add that FP fusion could contract.

Autotuning: the key buckets M to powers of two (decode steps and prefills of every length share a
tuning run); under ``TRITON_INTERPRET=1`` the first config that fits is taken, untimed.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.backends.triton.common import INTERPRET, bf16_rne

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
        v = bf16_rne(v)
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


# ---- launchers ------------------------------------------------------------------------------------------


def launch_gemm(
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
    """Run the GEMM on ``a [M, K]`` (int8, or float with ``fuse_quant``) into ``out [M, N]``
    (flags: module docstring)."""
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


def launch_quant_rows(
    x2: Tensor, q: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int, symmetric: bool
) -> None:
    """Quantize the rows of ``x2 [M, K]`` into ``q [M, K]`` int8, ``scale [M]`` (x's dtype) and
    ``zp [M]`` int8."""
    m, k = x2.shape
    if m == 0:
        return

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]),)

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
