"""Integer-activation linears in Triton: ``qcompile::qlinear_wa`` (W8A8, W4A8, W4A4) and the fused
dynamic per-token activation quantization that usually precedes it.

The math, the zero-point correction, group scales and the bit-exact fused quantizer:
:mod:`qcompile.backends.triton.wa_kernels`.

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

``dyn_quant_linear`` quantizes x per token inside the GEMM (one launch), bit for bit as
``choose_qparams_per_token`` + ``quantize`` do.

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

from typing import Any

import torch
from torch import Tensor

import qcompile.ops  # noqa: F401  (defines qcompile::qlinear_wa, which register_impl looks up)
from qcompile.backends.triton.common import runtime_shape, triton_device_reason
from qcompile.backends.triton.wa_kernels import MAX_K, MIN_GROUP, launch_gemm, launch_quant_rows
from qcompile.ops.registry import KernelImpl, register_impl
from qcompile.quant.packing import INT4_OFFSET, is_blocked_int8, unpack_int4_weight

# ---- argument checks (errors name the op and the problem) ------------------------------------------------


def _fail(kernel: str, problem: str) -> ValueError:
    return ValueError(f"qcompile_triton::{kernel}: {problem}")


def _check_device(kernel: str, tensors: dict[str, Tensor | None]) -> torch.device:
    """Every tensor on one device, and a device Triton runs on (CPU only under the interpreter)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        where = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise _fail(kernel, f"tensors are on different devices ({where})")
    reason = triton_device_reason(first)
    if reason is not None:
        raise _fail(kernel, reason)
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
    _check_device(
        kernel,
        {"xq": xq, "x_scale": x_scale, "x_zero_point": x_zero_point, "w": w, "w_scale": w_scale,
         "w_colsum": w_colsum, "bias": bias},
    )  # fmt: skip
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
    launch_gemm(
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
    launch_quant_rows(x2, q, scale, zp, qmin, qmax, symmetric)
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
    _check_device(kernel, {"x": x, "w": w, "w_scale": w_scale, "w_colsum": w_colsum, "bias": bias})
    n = _check_weight(kernel, w, w_scale, w_bits, in_features, group_size)
    _check_bias_colsum(kernel, bias, w_colsum, n)
    _check_grid(kernel, qmin, qmax)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise _fail(kernel, f"x must be float32/float16/bfloat16, got {x.dtype}")
    if not symmetric and group_size == 0 and w_colsum is None:
        raise _fail(kernel, "asymmetric activations with per-channel weights need w_colsum (prepare_weight)")
    a = _rows(kernel, "x", x, in_features)
    out = torch.empty((a.shape[0], n), dtype=x.dtype, device=x.device)
    launch_gemm(
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
    launch_gemm(a, ones, None, 0, w, dummy_scale, None, None, out, w_bits, in_features, 0, int_out=True)
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


def _weight_unsupported(args: dict[str, Any], device: torch.device) -> str | None:
    """The reason this backend cannot take the call's weight (or device); None when it can."""
    reason = triton_device_reason(device)
    if reason is not None:
        return reason
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
    shape = runtime_shape(args["x_scale"])
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
