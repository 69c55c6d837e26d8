"""CPU kernels for the registry's quantized linears: torch's own packed-weight GEMMs.

torch ships two weight-only GEMMs for CPU that beat an fp32 ``F.linear`` on the dequantized weight
(decode, M = 1: the weight read dominates, and they read 4 or 8 bits per weight instead of 32):

- ``aten._weight_int4pack_mm_for_cpu(x, w, g, scales_and_zeros)``: ``w`` from
  ``aten._convert_weight_to_int4pack_for_cpu(u int32 [N, K], 1)`` with ``u`` in 0..15, and
  ``scales_and_zeros`` ``[K / g, N, 2]`` in x's dtype. Each weight is ``(u - 8) * scale + zero``
  (torch's int4mm kernel: the zero is a *float* added after the scale). qcompile's weight is
  ``(q - zp) * s`` with signed ``q = u - 8``, so ``zero = -zp * s`` (exact in real arithmetic; the
  kernel rounds ``s`` and ``-zp * s`` to the activation dtype). The kernel needs ``g`` in
  {32, 64, 128, 256}, ``K % g == 0`` and ``N % 16 == 0``. A qcompile group of 128 over
  K = 576 (SmolLM2: 4·128 + 64) runs at kernel group 64 — each 128-group's scale repeated twice, the
  ragged last group exactly one kernel group — so no padding; only a K that no kernel group divides
  is padded with zero weight columns (and x with zeros at run time), an N that is not a multiple of
  16 with zero rows (the extra outputs are sliced off).
- ``aten._weight_int8pack_mm(x, w int8 [N, K], scales [N])``: symmetric, one scale per output
  channel: ``x @ w.T * scales``; K must be a multiple of 16 (other widths abort the process in
  torch 2.13, so ``supports`` refuses them and the call keeps its reference).

Both are fast with **bfloat16 activations** (fp32 activations into the int8 kernel are ~5× slower):
a weight-only linear casts x to bf16, runs the kernel and casts the result back — a numeric change
stated in the README as a perplexity delta. With integer activations (``qlinear_wa``: W8A8, W4A8,
W4A4) nothing is lost on the way in: ``xq - x_zp`` is an integer in [-255, 255], exact in bf16, so the
kernel reads the exact integers and the per-token / per-tensor ``x_scale`` multiplies the fp32 result.

Each kernel is a ``qcompile_cpu::`` op with a ``CompositeImplicitAutograd`` implementation: eager it is
a few aten calls; when Inductor compiles the lowered graph it sees straight through it to the aten
GEMM (which Inductor lowers itself) and fuses the casts, the padding and the scale into neighbours.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from qcompile.ops.registry import KernelImpl, register_impl
from qcompile.quant.packing import weight_int8

BACKEND = "cpu"
KERNEL_GROUPS = (256, 128, 64, 32)  # what aten._weight_int4pack_mm_for_cpu accepts, largest first
N_MULTIPLE = 16  # aten._convert_weight_to_int4pack_for_cpu: N divisible by 16
INT8_K_MULTIPLE = 16  # aten._weight_int8pack_mm: K divisible by 16
ACT_DTYPE = torch.bfloat16  # the kernels' fast activation dtype

_LIB = torch.library.Library("qcompile_cpu", "DEF")
_LIB.define(
    "qlinear_w(Tensor x, Tensor w, Tensor scales, Tensor? bias, int w_bits, int kernel_group, "
    "int in_features, int out_features) -> Tensor"
)
_LIB.define(
    "qlinear_wa(Tensor xq, Tensor x_scale, Tensor? x_zero_point, Tensor w, Tensor scales, Tensor? bias, "
    "int w_bits, int kernel_group, int in_features, int out_features) -> Tensor"
)


def _gemm(
    x2: Tensor, w: Tensor, scales: Tensor, w_bits: int, kernel_group: int, in_features: int, out_features: int
) -> Tensor:
    """``x2`` [M, in] in the kernel dtype -> [M, out] in the kernel dtype. 4 bits: ``scales`` is the
    int4 kernel's ``scales_and_zeros`` (padding applied and dropped); 8 bits: one scale per channel."""
    if w_bits == 8:
        return torch.ops.aten._weight_int8pack_mm(x2, w, scales)
    k_padded = w.shape[1] * 2
    if k_padded != in_features:
        # zeros meet the padded (zero) weight columns; cat, not F.pad, which cannot trace a symbolic M
        x2 = torch.cat([x2, x2.new_zeros(x2.shape[0], k_padded - in_features)], dim=1)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w, kernel_group, scales)
    if y.shape[1] != out_features:
        y = y[:, :out_features]
    return y


def _finish(
    y: Tensor, lead: Any, out_dtype: torch.dtype, x_scale: Tensor | None, bias: Tensor | None
) -> Tensor:
    y = y.to(out_dtype).reshape(*lead, y.shape[-1])
    if x_scale is not None:
        y = y * x_scale
    if bias is not None:
        y = y + bias
    return y


def qlinear_w_cpu(x, w, scales, bias, w_bits, kernel_group, in_features, out_features):
    """Weight-only linear: x cast to the kernel dtype (bfloat16), the packed GEMM, cast back, + bias."""
    x2 = x.reshape(-1, in_features).to(scales.dtype)
    y = _gemm(x2, w, scales, w_bits, kernel_group, in_features, out_features)
    return _finish(y, x.shape[:-1], x.dtype, None, bias)


def qlinear_wa_cpu(
    xq, x_scale, x_zero_point, w, scales, bias, w_bits, kernel_group, in_features, out_features
):
    """Integer-activation linear: the exact integers ``xq - x_zp`` (in [-255, 255], exact in bfloat16)
    through the packed GEMM, then ``* x_scale`` in x_scale's dtype, + bias."""
    if x_zero_point is None:
        xi = xq.to(scales.dtype)
    else:
        xi = (xq.to(torch.int16) - x_zero_point.to(torch.int16)).to(scales.dtype)
    y = _gemm(xi.reshape(-1, in_features), w, scales, w_bits, kernel_group, in_features, out_features)
    return _finish(y, xq.shape[:-1], x_scale.dtype, x_scale, bias)


_LIB.impl("qlinear_w", qlinear_w_cpu, "CompositeImplicitAutograd")
_LIB.impl("qlinear_wa", qlinear_wa_cpu, "CompositeImplicitAutograd")

QLINEAR_W_KERNEL = torch.ops.qcompile_cpu.qlinear_w.default
QLINEAR_WA_KERNEL = torch.ops.qcompile_cpu.qlinear_wa.default


# ---- layouts -------------------------------------------------------------------------------------------


def kernel_group(group_size: int, in_features: int) -> tuple[int, int] | None:
    """``(g, padded K)``: a kernel group of :data:`KERNEL_GROUPS` that lies inside one qcompile group
    (0 = per channel), choosing the least padding of K (none when g divides K), then the largest g.
    None when no kernel group fits inside a qcompile group (a group that is not a multiple of 32)."""
    if group_size == 0 or group_size >= in_features:
        candidates = list(KERNEL_GROUPS)
    else:
        candidates = [g for g in KERNEL_GROUPS if group_size % g == 0]
    if not candidates:
        return None
    g = min(candidates, key=lambda c: (math.ceil(in_features / c) * c, -c))
    return g, math.ceil(in_features / g) * g


def _expand_groups(t: Tensor, group_size: int, in_features: int, g: int, k_padded: int) -> Tensor:
    """Per-qcompile-group ``t`` [N, G] -> per-kernel-group [N, k_padded / g]."""
    width = in_features if group_size == 0 else group_size
    cols = torch.arange(k_padded // g) * g  # first input column of each kernel group
    idx = torch.clamp(cols // width, max=t.shape[1] - 1)
    return t[:, idx]


def pack_int4(args: dict[str, Any], dtype: torch.dtype = ACT_DTYPE) -> tuple[Tensor, Tensor, int]:
    """qcompile's int4 weight (any storage) -> ``(packed w, scales_and_zeros, kernel group)``."""
    w, scale, zp_packed = args["w"], args["w_scale"], args["w_zero_point"]
    k, group_size = int(args["in_features"]), int(args["group_size"])
    q, zp = weight_int8(w, scale, zp_packed, int(args["w_bits"]), k)
    fit = kernel_group(group_size, k)
    if fit is None:  # supports() said no already
        raise ValueError(f"no kernel group for group size {group_size}")
    g, k_padded = fit
    n = q.shape[0]
    n_padded = math.ceil(n / N_MULTIPLE) * N_MULTIPLE
    u = q.to(torch.int32) + 8
    u = torch.nn.functional.pad(u, (0, k_padded - k, 0, n_padded - n), value=8)  # q = 0: zero weight
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    s = _expand_groups(scale.to(torch.float32), group_size, k, g, k_padded)
    z = _expand_groups(zp.to(torch.float32), group_size, k, g, k_padded)
    s = torch.nn.functional.pad(s, (0, 0, 0, n_padded - n), value=1.0)
    z = torch.nn.functional.pad(z, (0, 0, 0, n_padded - n))
    sz = torch.stack([s, -z * s], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [K/g, N, 2]
    return packed, sz, g


# ---- supports / prepare ---------------------------------------------------------------------------------


def _runtime_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.Tensor):
        return value.dtype
    if isinstance(value, fx.Node) and isinstance(value.meta.get("val"), torch.Tensor):
        return value.meta["val"].dtype
    return None


def _common_reason(args: dict[str, Any], device: torch.device, x_key: str) -> str | None:
    if device.type != "cpu":
        return f"device {device}: the CPU kernels run on CPU tensors"
    if args["w_scale"].dtype not in (torch.float32, torch.bfloat16):
        return f"scale dtype {args['w_scale'].dtype}: the CPU kernels take float32 or bfloat16 scales"
    if x_key == "x":
        dtype = _runtime_dtype(args["x"])
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
            return f"activation dtype {dtype}: the CPU kernels take float32 or bfloat16"
    return None


def _symmetric(args: dict[str, Any]) -> bool:
    zp = args["w_zero_point"]
    return zp is None or not bool(
        weight_int8(args["w"], args["w_scale"], zp, args["w_bits"], args["in_features"])[1].any()
    )


def _int8_reason(args: dict[str, Any]) -> str | None:
    if int(args["in_features"]) % INT8_K_MULTIPLE:
        # aten._weight_int8pack_mm aborts the process (no error) on other widths (torch 2.13, measured)
        return f"in_features {args['in_features']}: aten._weight_int8pack_mm needs a multiple of {INT8_K_MULTIPLE}"
    if int(args["group_size"]) != 0 and int(args["group_size"]) < int(args["in_features"]):
        return (
            f"int8 weights in groups of {args['group_size']}: aten._weight_int8pack_mm has one scale per "
            "output channel"
        )
    if not _symmetric(args):
        return "asymmetric int8 weights: aten._weight_int8pack_mm has no zero point"
    return None


def _int4_reason(args: dict[str, Any]) -> str | None:
    if kernel_group(int(args["group_size"]), int(args["in_features"])) is None:
        return (
            f"int4 group size {args['group_size']}: aten._weight_int4pack_mm_for_cpu needs a group of "
            f"{'/'.join(map(str, sorted(KERNEL_GROUPS)))} inside each qcompile group"
        )
    return None


def _supports(args: dict[str, Any], device: torch.device, activation: str) -> str | None:
    why = _common_reason(args, device, activation)
    if why is not None:
        return why
    bits = int(args["w_bits"])
    if bits == 4:
        return _int4_reason(args)
    if bits == 8:
        return _int8_reason(args)
    return f"w_bits {bits}: the CPU kernels take 4 or 8"


def supports_qlinear_w(args: dict[str, Any], device: torch.device) -> str | None:
    """None when a CPU kernel computes this ``qcompile::qlinear_w`` call, else why not."""
    return _supports(args, device, "x")


def supports_qlinear_wa(args: dict[str, Any], device: torch.device) -> str | None:
    """None when a CPU kernel computes this ``qcompile::qlinear_wa`` call, else why not."""
    return _supports(args, device, "xq")


def _prepared_weight(args: dict[str, Any]) -> dict[str, Any]:
    """The weight in the kernel's layout: int8 per channel as is (scales in bf16), int4 repacked."""
    k, n = int(args["in_features"]), int(args["w_scale"].shape[0])
    if int(args["w_bits"]) == 8:
        q, _ = weight_int8(args["w"], args["w_scale"], args["w_zero_point"], 8, k)
        scales = args["w_scale"].reshape(-1).to(ACT_DTYPE).contiguous()
        return {"w": q.contiguous(), "scales": scales, "w_bits": 8, "kernel_group": 0}
    w, sz, g = pack_int4(args)
    return {"w": w, "scales": sz, "w_bits": 4, "kernel_group": g, "in_features": k, "out_features": n}


def prepare_qlinear_w(args: dict[str, Any]) -> dict[str, Any]:
    """Arguments of ``qcompile::qlinear_w`` -> ``qcompile_cpu::qlinear_w``'s (weights repacked once)."""
    k, n = int(args["in_features"]), int(args["w_scale"].shape[0])
    base = {"x": args["x"], "bias": args["bias"], "in_features": k, "out_features": n}
    return {**base, **_prepared_weight(args)}


def prepare_qlinear_wa(args: dict[str, Any]) -> dict[str, Any]:
    """Arguments of ``qcompile::qlinear_wa`` -> ``qcompile_cpu::qlinear_wa``'s."""
    k, n = int(args["in_features"]), int(args["w_scale"].shape[0])
    base = {
        "xq": args["xq"], "x_scale": args["x_scale"], "x_zero_point": args["x_zero_point"],
        "bias": args["bias"], "in_features": k, "out_features": n,
    }  # fmt: skip
    return {**base, **_prepared_weight(args)}


QLINEAR_W_CPU = KernelImpl(QLINEAR_W_KERNEL, prepare_qlinear_w, supports_qlinear_w)
QLINEAR_WA_CPU = KernelImpl(QLINEAR_WA_KERNEL, prepare_qlinear_wa, supports_qlinear_wa)

register_impl(BACKEND, "qlinear_w", QLINEAR_W_CPU)
register_impl(BACKEND, "qlinear_wa", QLINEAR_WA_CPU)
