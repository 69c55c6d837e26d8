"""Weight-only quantized linear in Triton: ``qcompile::qlinear_w`` (W4A16, W8A16) as
``qcompile_triton::qlinear_w``.

``y = linear(x, Ŵ, bias)`` with ``Ŵ = (q - zp) · scale``, groups along K (ragged last group; group
size 0 = one group per output channel), symmetric (no zero point) or asymmetric, activations
fp16 / bf16 / fp32 in and the same dtype out, accumulation in fp32. The weights are repacked once, at
lowering, into the layout of :mod:`.layout` (K-major, N contiguous, 8 int4 per int32 along K;
scales ``[G, N]``), where the module docstring says why.

Two kernels, chosen by M (the rows of x flattened), because the two regimes are bound by different
things:

- **M ≤ 8, split-K GEMV** (:func:`_wo_gemv_kernel`): decoding reads every weight once per token,
  so the time is the weight bytes over the memory bandwidth. One program owns ``BLOCK_N`` outputs of a
  ``k_split`` slice of K for all M rows: it dequantizes its weight tile once and reuses it for every
  row (at M = 1 elementwise FMAs into a ``[BLOCK_K, BLOCK_N]`` accumulator reduced once at the end;
  for more rows a broadcast multiply and a ``tl.sum`` per row and K step; no tensor cores, which would
  waste ≥ 15/16 of an MMA at M = 1). Splitting K gives the GPU enough programs when N is small
  (SmolLM2's 576 outputs are 5 tiles of 128 — a few percent of an H100's SMs — without it).

  The split-K partial sums go through a **second reduction pass** (:func:`_splitk_reduce_kernel`),
  not atomics: the sum over the splits is then in a fixed order, so the output is bit-reproducible
  run to run (qcompile compares graphs numerically — EquivalenceCheck, SQNR reports, tests — and an
  atomic fp32 sum changes its last bits with the schedule); the output needs no zero-initialising
  memset; and the bias and the cast to fp16/bf16 fuse into that pass (fp16 atomics would accumulate
  in fp16; fp32 atomics would need a cast pass anyway). The cost is one more small launch and
  ``2 · 4 · split · M · N`` bytes of partials; the split count is capped so that stays well under the
  weight bytes, and when K is not split the GEMV kernel stores the output itself.
- **M > 8, GEMM** (:func:`_wo_gemm_kernel`): a ``tl.dot`` tile loop (grouped program order for L2
  reuse) that dequantizes the ``[BLOCK_K, BLOCK_N]`` weight tile inside the K loop — the weights are
  read once per tile from HBM, as int4/int8, and never materialised in fp16.

Dequantization rounds Ŵ to the scale's dtype (which must be x's), exactly as the reference
(:func:`qcompile.quant.packing.dequantize_weight`) does; only the accumulation order differs.

Autotuning is keyed on N, K and a power-of-two bucket of M (prefill lengths vary per call; the
bucket keeps them from re-tuning each time). Under ``TRITON_INTERPRET=1`` (the CPU tests) each
kernel has a single small config: the interpreter runs every program in Python, and autotuning there
would only multiply its cost.
"""

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.backends.triton.common import (
    FLOAT_DTYPES,
    INTERPRET,
    bf16_rne,
    runtime_dtype,
    triton_device_reason,
)
from qcompile.backends.triton.layout import PackedWeight, check_storage, num_groups, repack_weight
from qcompile.ops.registry import KernelImpl, register_impl

KERNEL = "qcompile_triton::qlinear_w"
GEMV_MAX_M = 8  # M <= 8: split-K GEMV; above: the tl.dot GEMM
SPLIT_ALIGN = 128  # a K split is a multiple of this (the largest BLOCK_K), so tiles never straddle a split
MAX_SPLIT_K = 16


# ---- autotune configs ----------------------------------------------------------------------------------


def gemv_configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=1)]
    shapes = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K <= SPLIT_ALIGN
        (32, 128, 2, 3),
        (64, 64, 2, 3),
        (64, 128, 4, 3),
        (128, 32, 4, 4),
        (128, 64, 4, 3),
        (128, 128, 4, 4),
        (256, 64, 8, 3),
        (256, 128, 8, 3),
    ]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]


def gemm_configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (16, 64, 128, 4, 4),
        (16, 128, 64, 4, 4),
        (32, 64, 128, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 128, 128, 8, 3),
        (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def prune_gemm_configs(configs, named_args, **kwargs):
    """Drop row tiles much taller than the bucket of M (all padding, half the tensor cores idle). The
    autotuner passes positional arguments in ``named_args`` and keyword ones as ``kwargs``."""
    bucket = {**named_args, **kwargs}["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, bucket)]
    return kept or configs[:1]


# ---- kernels ------------------------------------------------------------------------------------------


# The interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even, as torch does); under
# TRITON_INTERPRET=1 the rounding is done by hand so the CPU tests see the GPU's numbers.
_BF16_RNE_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 ``v`` -> ``dtype``, rounding to nearest even (the GPU's cast; by hand for bf16 in the interpreter)."""
    if _BF16_RNE_BY_HAND:
        if dtype == tl.bfloat16:
            v = bf16_rne(v)
    return v.to(dtype)


@triton.jit
def _dequant_tile(
    w_ptr,
    s_ptr,
    z_ptr,
    k0,
    offs_k,
    offs_n,
    N,
    K,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    HAS_ZP: tl.constexpr,
    ZP_DEFAULT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The ``[BLOCK_K, BLOCK_N]`` tile ``(q - zp) · scale`` (fp32) at rows ``offs_k`` (starting at k0) and
    columns ``offs_n``; zero rows past K are left to x's zero padding (their values are finite)."""
    mask_n = offs_n < N
    mask = (offs_k < K)[:, None] & mask_n[None, :]
    if BITS == 4:
        # Row k reads word k // 8 (8 consecutive rows hit the same word: L1), nibble k % 8.
        words = tl.load(w_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
    else:
        q = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.int32)
    if GS % BLOCK_K == 0:
        # The tile lies inside one group (k0 is a multiple of BLOCK_K): one row of scales.
        g = k0 // GS
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_ZP:
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)[None, :]
        else:
            z = ZP_DEFAULT
    else:
        # Groups smaller than the tile (or not dividing it): a group index per row.
        g = (offs_k // GS)[:, None]
        s = tl.load(s_ptr + g * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ZP:
            z = tl.load(z_ptr + g * N + offs_n[None, :], mask=mask, other=0).to(tl.int32)
        else:
            z = ZP_DEFAULT
    return (q - z).to(tl.float32) * s


@triton.autotune(configs=gemv_configs(), key=["N", "K", "BLOCK_M", "BITS", "GS"])
@triton.jit
def _wo_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    part_ptr,
    out_ptr,
    M,
    N,
    K,
    k_split,
    stride_xm,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    HAS_ZP: tl.constexpr,
    ZP_DEFAULT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSE_EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (n tile, K split): ``acc[m, n] = Σ_{k in split} x[m, k] Ŵ[n, k]`` for all M (≤ BLOCK_M) rows.
    Stores the fp32 partial ``part[split, m, n]``, or (one split) ``out`` with the bias."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # M = 1: elementwise FMAs into a [BLOCK_K, BLOCK_N] accumulator, reduced over K once at the end (a
    # cross-warp reduction per K step would dominate a GEMV). M > 1: one reduction per row and step,
    # the dequantized tile shared by the rows (a [BLOCK_M, BLOCK_K, BLOCK_N] accumulator would not fit).
    acc_k = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _dequant_tile(
            w_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, N, K, BITS, GS, HAS_ZP, ZP_DEFAULT, BLOCK_K
        )
        w = round_to(w, s_ptr.dtype.element_ty).to(tl.float32)  # Ŵ rounded as the reference rounds it
        if BLOCK_M == 1:
            x_0 = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
            acc_k += x_0.to(tl.float32)[:, None] * w
        else:
            for m in tl.static_range(BLOCK_M):
                row_ok = tl.full((BLOCK_K,), m, tl.int32) < M  # rows past M load zeros (never stored)
                x_m = tl.load(x_ptr + m * stride_xm + offs_k, mask=(offs_k < K) & row_ok, other=0.0)
                row = tl.sum(x_m.to(tl.float32)[:, None] * w, axis=0)
                acc = tl.where(offs_m[:, None] == m, acc + row[None, :], acc)
    if BLOCK_M == 1:
        acc = tl.sum(acc_k, axis=0)[None, :]
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if FUSE_EPILOGUE:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, round_to(acc, out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, b_ptr, out_ptr, M, N, split_k, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    """``out[m, n] = Σ_s part[s, m, n] (+ bias[n])`` in split order, cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split_k):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=gemm_configs(),
    key=["N", "K", "M_BUCKET", "BITS", "GS"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
)
@triton.jit
def _wo_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    M_BUCKET,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    HAS_ZP: tl.constexpr,
    ZP_DEFAULT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Program (m tile, n tile): ``out = x Ŵᵀ (+ bias)`` with the weight tile dequantized in the K loop.
    ``M_BUCKET`` is only an autotune key."""
    pid = tl.program_id(0)
    # Grouped order: GROUP_M row tiles sweep the n tiles together, so a weight tile loaded for one row
    # tile is still in L2 for the next ones.
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = mask_m[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        w = _dequant_tile(
            w_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, N, K, BITS, GS, HAS_ZP, ZP_DEFAULT, BLOCK_K
        )
        w = round_to(w, x.dtype)  # = the scale's dtype: Ŵ rounded as the reference rounds it
        if UPCAST_DOT:
            # The interpreter stores bf16 as raw uint16 and its dot would multiply the bits; fp32 operands
            # give the same products (bf16·bf16 is exact in fp32) and fp32 accumulation, as the MMA does.
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif IEEE_FP32:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, round_to(acc, out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---- launch wrapper -----------------------------------------------------------------------------------


def _fail(problem: str) -> ValueError:
    return ValueError(f"{KERNEL}: {problem}")


def check_inputs(
    x: Tensor,
    w: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    w_bits: int,
    in_features: int,
    group_size: int,
) -> None:
    """Raise a ValueError naming the kernel and the problem unless the inputs are in the kernels' layout
    (:mod:`.layout`), on one device the kernels run on, with matching dtypes."""
    if w_bits not in (4, 8):
        raise _fail(f"w_bits must be 4 or 8, got {w_bits}")
    if group_size < 0:
        raise _fail(f"group_size must be 0 (per output channel) or positive, got {group_size}")
    if x.dtype not in FLOAT_DTYPES:
        raise _fail(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise _fail(f"x's last dim must be in_features = {in_features}, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise _fail(f"x's last dim must be contiguous (stride 1), got strides {tuple(x.stride())}")
    words = math.ceil(in_features / 8) if w_bits == 4 else in_features
    w_dtype = torch.int32 if w_bits == 4 else torch.int8
    if w.dtype != w_dtype or w.dim() != 2 or w.shape[0] != words:
        raise _fail(
            f"w must be {w_dtype} [{words}, N] for w_bits {w_bits} (backends/triton/layout.py: repack_weight "
            f"converts qcompile's storage), got {w.dtype} {tuple(w.shape)}"
        )
    n = w.shape[1]
    groups = num_groups(in_features, group_size)
    if scales.shape != (groups, n):
        raise _fail(
            f"scales must be [G, N] = [{groups}, {n}] (G = ceil(in_features / group_size)), "
            f"got {tuple(scales.shape)}"
        )
    if scales.dtype != x.dtype:
        raise _fail(
            f"scales' dtype {scales.dtype} must be x's ({x.dtype}): Ŵ is rounded to it, as in the reference"
        )
    if zeros is not None and (zeros.dtype != torch.int8 or zeros.shape != (groups, n)):
        raise _fail(f"zeros must be None or int8 [{groups}, {n}], got {zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise _fail(f"bias must be None or {x.dtype} [{n}], got {bias.dtype} {tuple(bias.shape)}")
    tensors = {"w": w, "scales": scales, "zeros": zeros, "bias": bias}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise _fail(f"{name} is on {t.device}, x on {x.device}: all inputs must be on one device")
        if t is not None and not t.is_contiguous():
            raise _fail(f"{name} must be contiguous (repack_weight makes it so)")
    reason = triton_device_reason(x.device)
    if reason is not None:
        raise _fail(reason)


def _kernel_group(group_size: int, in_features: int) -> int:
    """The group size the kernels index with: per-channel scales (0) become one group covering K, a
    power of two so every BLOCK_K divides it (the one-row-of-scales path)."""
    return group_size if group_size > 0 else triton.next_power_of_2(max(in_features, SPLIT_ALIGN))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, but enough that the tests split K


def split_k_chunk(m: int, n: int, k: int, w_bits: int, device: torch.device) -> int:
    """The K slice of one GEMV program (a multiple of SPLIT_ALIGN). Enough splits to give ~2 programs per
    SM over ~128-wide n tiles; each split at least 256 of K (less is launch overhead); and the partials
    (``2 · 4 · split · M · N`` bytes, written and read) at most a quarter of the weight bytes."""
    wanted = triton.cdiv(2 * _num_sms(device), triton.cdiv(n, 128))
    by_length = max(1, k // 256)
    by_traffic = max(1, (k * w_bits // 8) // (4 * 8 * m))
    split = max(1, min(wanted, by_length, by_traffic, MAX_SPLIT_K))
    return triton.cdiv(triton.cdiv(k, split), SPLIT_ALIGN) * SPLIT_ALIGN


@torch.library.triton_op(KERNEL, mutates_args=())
def triton_qlinear_w(
    x: Tensor,
    w: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    w_bits: int,
    in_features: int,
    group_size: int,
) -> Tensor:
    """``linear(x, Ŵ, bias)`` on weights in :mod:`.layout`'s layout: the GEMV path for M ≤ 8, else the GEMM."""
    check_inputs(x, w, scales, zeros, bias, w_bits, in_features, group_size)
    k, n = in_features, w.shape[1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    common = {
        "BITS": w_bits,
        "GS": _kernel_group(group_size, k),
        "HAS_ZP": zeros is not None,
        "ZP_DEFAULT": 8 if w_bits == 4 else 0,
        "HAS_BIAS": bias is not None,
    }
    # Pointers a branch never reads get a harmless stand-in (the constexpr flags prune those loads).
    z_arg = zeros if zeros is not None else scales
    b_arg = bias if bias is not None else scales
    if m <= GEMV_MAX_M:
        chunk = split_k_chunk(m, n, k, w_bits, x.device)
        splits = triton.cdiv(k, chunk)
        part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
        torch.library.wrap_triton(_wo_gemv_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)](
            x2,
            w,
            scales,
            z_arg,
            b_arg,
            part,
            out,
            m,
            n,
            k,
            chunk,
            x2.stride(0),
            FUSE_EPILOGUE=splits == 1,
            BLOCK_M=triton.next_power_of_2(m),
            **common,
        )
        if splits > 1:
            block = 128 if INTERPRET else 1024
            torch.library.wrap_triton(_splitk_reduce_kernel)[(triton.cdiv(m * n, block),)](
                part, b_arg, out, m, n, splits, HAS_BIAS=bias is not None, BLOCK=block
            )
    else:
        ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        torch.library.wrap_triton(_wo_gemm_kernel)[grid](
            x2,
            w,
            scales,
            z_arg,
            b_arg,
            out,
            m,
            n,
            k,
            x2.stride(0),
            triton.next_power_of_2(m),
            IEEE_FP32=ieee,
            UPCAST_DOT=INTERPRET and x.dtype == torch.bfloat16,
            **common,
        )
    return out.reshape(*x.shape[:-1], n)


@triton_qlinear_w.register_fake
def _triton_qlinear_w_fake(x, w, scales, zeros, bias, w_bits, in_features, group_size):
    torch._check(
        x.shape[-1] == in_features,
        lambda: f"{KERNEL}: x's last dim {x.shape[-1]} is not in_features = {in_features}",
    )
    return x.new_empty((*x.shape[:-1], w.shape[1]))


# ---- the registry's view: qcompile::qlinear_w realised by this kernel ---------------------------------


def prepare_qlinear_w(args: dict) -> dict:
    """``qcompile::qlinear_w``'s arguments -> ``qcompile_triton::qlinear_w``'s: the weight, scales and
    zero points repacked (:func:`.layout.repack_weight`), x and bias passed through."""
    packed: PackedWeight = repack_weight(
        args["w"],
        args["w_scale"],
        args["w_zero_point"],
        args["w_bits"],
        args["in_features"],
        args["group_size"],
    )
    return {
        "x": args["x"],
        "w": packed.w,
        "scales": packed.scales,
        "zeros": packed.zeros,
        "bias": args["bias"],
        "w_bits": packed.w_bits,
        "in_features": packed.in_features,
        "group_size": packed.group_size,
    }


def supports_qlinear_w(args: dict, device: torch.device) -> str | None:
    """None when the kernel handles this ``qcompile::qlinear_w`` call on ``device``, else why not."""
    reason = triton_device_reason(device)
    if reason is not None:
        return reason
    if args["w_bits"] not in (4, 8):
        return f"w_bits {args['w_bits']}: the Triton weight-only kernels handle 4 and 8"
    scale = args["w_scale"]
    if scale.dtype not in FLOAT_DTYPES:
        return f"scale dtype {scale.dtype}: the kernels take float16, bfloat16 or float32 scales"
    x_dtype = runtime_dtype(args["x"])
    if x_dtype is not None and x_dtype != scale.dtype:
        return f"x is {x_dtype} but the scales are {scale.dtype}: the kernel computes in one activation dtype"
    bias = args.get("bias")
    if bias is not None and bias.dtype != scale.dtype:
        return f"bias dtype {bias.dtype} differs from the scales' {scale.dtype}"
    try:
        check_storage(
            args["w"], scale, args["w_zero_point"], args["w_bits"], args["in_features"], args["group_size"]
        )
    except ValueError as err:
        return f"weight storage not understood: {err}"
    return None


QLINEAR_W_TRITON = torch.ops.qcompile_triton.qlinear_w.default

register_impl("triton", "qlinear_w", KernelImpl(QLINEAR_W_TRITON, prepare_qlinear_w, supports_qlinear_w))
