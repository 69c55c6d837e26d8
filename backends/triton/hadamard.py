"""The online Hadamard rotation in Triton: ``qcompile::hadamard(x, n, block, k)`` as
``qcompile_triton::hadamard``.

The transform (:func:`qcompile.quant.hadamard.hadamard_transform`, the ground truth) multiplies each
``block``-wide segment of the last dim by ``(H_K ⊗ H_{2^m}) / √block``: with the segment viewed as a
``[K, P = 2^m]`` matrix X, that is ``H_Kᵀ · X · H_P / √block`` — a fast Walsh–Hadamard transform
along P and a small dense K×K mix along K (the two commute, being on different axes).

One program owns ``BLOCK_ROWS`` segments and keeps them in registers as a ``[BLOCK_ROWS, KP, P]``
tile (``KP`` = K rounded up to a power of two, the padding rows masked):

1. the K mix first, straight from memory: ``acc[:, i, :] += H_K[j, i] · x[:, j, :]`` for j < K, each
   x row read once (K = 1, the pure power-of-two case, just loads the tile). That is O(K²·P) FMAs on
   CUDA cores, exact in fp32; at K = 12–36 (the hidden sizes that need a K) it is small next to the
   memory traffic. At K = 108–172 a ``tl.dot`` would likely pay off (tensor cores, fp32 via 3xTF32) —
   not done until a GPU measurement says so;
2. the FWHT along P in log₂ P identical stages, the *constant-geometry* form (Pease 1968): split the
   row into halves a, b and interleave ``(a + b, a − b)``. Each stage moves the top index bit to the
   bottom and applies H_2 to it, so after log₂ P stages every bit has had its H_2 and is back in
   place: Sylvester's ``H_P`` in natural order, the reference's. The fixed shape of a stage is what
   makes it expressible as ``reshape → permute → split → join`` on a register tile;
3. the 1/√block scale, the cast, one store.

Plan kinds (:class:`qcompile.quant.hadamard.OnlineHadamardPlan`): ``exact`` is one segment per row;
``block_diagonal`` is ``n / block`` segments per row (consecutive channel groups, so it is the exact
kernel on ``M · n / block`` rows — no extra code); ``padded`` (block > n) loads the ``block − n``
missing channels as zeros (a mask, no copy) and writes the ``block``-wide output. The identity plan
(``block == 1``) has no kernel: there is nothing to compute, and ``supports`` says so. Segments
larger than :data:`MAX_TILE` elements (``KP · P``) do not fit a register tile and are refused too;
they would need a two-pass (shared-memory / global) FWHT.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.backends.triton.common import FLOAT_DTYPES, INTERPRET, runtime_dtype, triton_device_reason
from qcompile.backends.triton.wo_linear import round_to
from qcompile.ops.registry import KernelImpl, register_impl
from qcompile.quant.hadamard import HadamardError, k_matrix, plan_from_op_args

KERNEL = "qcompile_triton::hadamard"
MAX_TILE = 16384  # KP · P elements of one segment: 64 fp32 registers per thread at 8 warps


def configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_ROWS": 4}, num_warps=1)]
    return [
        triton.Config({"BLOCK_ROWS": rows}, num_warps=warps)
        for rows in (1, 2, 4, 8, 16)
        for warps in (2, 4, 8)
    ]


def prune_configs(candidates, named_args, **kwargs):
    """Keep tiles of at most MAX_TILE elements, at most 128 fp32 values per thread (more spills), and no
    taller than the rows there are. The autotuner passes positional arguments in ``named_args`` and
    keyword ones (the constexprs) as ``kwargs``."""
    args = {**named_args, **kwargs}
    seg, rows = args["KP"] * args["P"], args["ROWS_BUCKET"]

    def fits(c: triton.Config) -> bool:
        tile = c.kwargs["BLOCK_ROWS"] * seg
        return tile <= MAX_TILE and tile <= 128 * 32 * c.num_warps and c.kwargs["BLOCK_ROWS"] <= rows

    return [c for c in candidates if fits(c)] or candidates[:1]


@triton.autotune(
    configs=configs(),
    key=["K", "P", "ROWS_BUCKET"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit
def _hadamard_kernel(
    x_ptr,
    h_ptr,
    out_ptr,
    segments,
    seg_per_row,
    n_valid,
    stride_xm,
    scale,
    ROWS_BUCKET,
    K: tl.constexpr,
    KP: tl.constexpr,
    P: tl.constexpr,
    LOG_P: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Segments ``r`` (= row ``r // seg_per_row``, segment ``r % seg_per_row`` of it): ``out[r] =
    (H_K ⊗ H_P) x[r] / √(K·P)``, x's channels ≥ ``n_valid`` read as zeros. ``ROWS_BUCKET`` only keys
    the autotuner."""
    offs_r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_i = tl.arange(0, KP)
    offs_p = tl.arange(0, P)
    mask_r = offs_r < segments
    # Segment r starts at row r // seg_per_row (any row stride) plus its offset inside the row.
    x_rows = (offs_r // seg_per_row) * stride_xm + (offs_r % seg_per_row) * (K * P)
    if K == 1:
        mask = mask_r[:, None] & (offs_p < n_valid)[None, :]
        acc = tl.load(x_ptr + x_rows[:, None] + offs_p[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = tl.reshape(acc, [BLOCK_ROWS, KP, P])
    else:
        acc = tl.zeros((BLOCK_ROWS, KP, P), dtype=tl.float32)
        for j in range(K):  # out[:, i, :] = Σ_j H_K[j, i] x[:, j, :]  (H_Kᵀ X)
            cols = j * P + offs_p
            mask = mask_r[:, None] & (cols < n_valid)[None, :]
            x_j = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h_j = tl.load(h_ptr + j * K + offs_i, mask=offs_i < K, other=0.0)
            acc += h_j[None, :, None] * x_j[:, None, :]
    y = tl.reshape(acc, [BLOCK_ROWS * KP, P])
    for _ in tl.static_range(LOG_P):  # constant-geometry FWHT stage: (a, b) -> interleave(a + b, a - b)
        a, b = tl.split(tl.permute(tl.reshape(y, [BLOCK_ROWS * KP, 2, P // 2]), (0, 2, 1)))
        y = tl.reshape(tl.join(a + b, a - b), [BLOCK_ROWS * KP, P])
    y = tl.reshape(y, [BLOCK_ROWS, KP, P]) * scale
    out_offs = offs_r[:, None, None] * (K * P) + offs_i[None, :, None] * P + offs_p[None, None, :]
    out_mask = mask_r[:, None, None] & (offs_i < K)[None, :, None]
    tl.store(out_ptr + out_offs, round_to(y, out_ptr.dtype.element_ty), mask=out_mask)


# ---- launch wrapper -----------------------------------------------------------------------------------


def _fail(problem: str) -> ValueError:
    return ValueError(f"{KERNEL}: {problem}")


def tile_reason(block: int, k: int) -> str | None:
    """None when a segment of ``block = k · 2^m`` fits the kernel's register tile, else why not."""
    tile = triton.next_power_of_2(k) * (block // k)
    if tile > MAX_TILE:
        return (
            f"block {block} = {k}·{block // k} needs a {tile}-element register tile (> {MAX_TILE}); "
            "the kernel keeps one segment in registers"
        )
    return None


def check_inputs(x: Tensor, h_k: Tensor, n: int, block: int, k: int):
    """Raise a ValueError naming the kernel and the problem unless the call is one the kernel runs; returns
    the plan."""
    try:
        plan = plan_from_op_args(n, block, k)
    except HadamardError as err:
        raise _fail(f"(n={n}, block={block}, k={k}) is no online Hadamard plan: {err}") from None
    if plan.is_identity:
        raise _fail(f"block 1 is the identity plan: there is nothing for a kernel to do (n={n})")
    reason = tile_reason(block, k)
    if reason is not None:
        raise _fail(reason)
    if x.dtype not in FLOAT_DTYPES:
        raise _fail(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != n:
        raise _fail(f"x's last dim must be n = {n}, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise _fail(f"x's last dim must be contiguous (stride 1), got strides {tuple(x.stride())}")
    if h_k.dtype != torch.float32 or h_k.shape != (k, k) or not h_k.is_contiguous():
        raise _fail(
            f"h_k must be the contiguous float32 [{k}, {k}] K-matrix, got {h_k.dtype} {tuple(h_k.shape)}"
        )
    if h_k.device != x.device:
        raise _fail(f"h_k is on {h_k.device}, x on {x.device}: both must be on one device")
    reason = triton_device_reason(x.device)
    if reason is not None:
        raise _fail(reason)
    return plan


@torch.library.triton_op(KERNEL, mutates_args=())
def triton_hadamard(x: Tensor, h_k: Tensor, n: int, block: int, k: int) -> Tensor:
    """``qcompile::hadamard(x, n, block, k)`` with ``h_k`` the ±1 K-matrix (float32 ``[k, k]``)."""
    plan = check_inputs(x, h_k, n, block, k)
    x2 = x.reshape(-1, n)
    m = x2.shape[0]
    out = torch.empty((m, plan.out_features), dtype=x.dtype, device=x.device)
    seg_per_row = plan.num_blocks
    segments = m * seg_per_row
    if segments > 0:
        p = block // k
        torch.library.wrap_triton(_hadamard_kernel)[
            lambda meta: (triton.cdiv(segments, meta["BLOCK_ROWS"]),)
        ](
            x2,
            h_k,
            out,
            segments,
            seg_per_row,
            min(n, block),
            x2.stride(0),
            1.0 / math.sqrt(block),
            min(triton.next_power_of_2(segments), 1024),
            K=k,
            KP=triton.next_power_of_2(k),
            P=p,
            LOG_P=p.bit_length() - 1,
        )
    return out.reshape(*x.shape[:-1], plan.out_features)


@triton_hadamard.register_fake
def _triton_hadamard_fake(x, h_k, n, block, k):
    plan = plan_from_op_args(n, block, k)
    torch._check(x.shape[-1] == n, lambda: f"{KERNEL}: last dim {x.shape[-1]} does not match n = {n}")
    return x.new_empty((*x.shape[:-1], plan.out_features))


# ---- the registry's view: qcompile::hadamard realised by this kernel ----------------------------------


def prepare_hadamard(args: dict) -> dict:
    """``qcompile::hadamard``'s arguments -> ``qcompile_triton::hadamard``'s: adds the K-matrix as a
    float32 constant (±1, exact), x passed through."""
    return {
        "x": args["x"],
        "h_k": k_matrix(args["k"]).to(torch.float32).contiguous(),
        "n": args["n"],
        "block": args["block"],
        "k": args["k"],
    }


def supports_hadamard(args: dict, device: torch.device) -> str | None:
    """None when the kernel handles this ``qcompile::hadamard`` call on ``device``, else why not."""
    reason = triton_device_reason(device)
    if reason is not None:
        return reason
    n, block, k = args["n"], args["block"], args["k"]
    try:
        plan = plan_from_op_args(n, block, k)
    except HadamardError as err:
        return f"not an online Hadamard plan: {err}"
    if plan.is_identity:
        return "identity plan (block 1): no rotation to compute, the reference's copy is all there is"
    reason = tile_reason(block, k)
    if reason is not None:
        return reason
    x_dtype = runtime_dtype(args["x"])
    if x_dtype is not None and x_dtype not in FLOAT_DTYPES:
        return f"x is {x_dtype}: the kernel takes float16, bfloat16 or float32"
    return None


HADAMARD_TRITON = torch.ops.qcompile_triton.hadamard.default

register_impl("triton", "hadamard", KernelImpl(HADAMARD_TRITON, prepare_hadamard, supports_hadamard))
