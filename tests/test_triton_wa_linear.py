"""Triton integer-activation linears (``backends/triton/wa_linear.py`` and ``wa_kernels.py``) against
the registry's torch reference, on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``,
set by conftest).

What must be exact: the activation quantizer (int8 values, scales, zero points: bit for bit the
reference ``choose_qparams_per_token`` + ``quantize``), the int32 accumulator, and the fused op
against the unfused pair (the same integers and the same fp32 epilogue). The float output is checked
against ``qcompile::qlinear_wa`` within a bound derived from both sides' rounding (:func:`_bound`).
Shapes are small and ragged: M = 1, 3, 17 (the interpreter's M tile is 16); N = 37 (N tile 64);
K = 96 and 97 (K tiles of 64, or 32 inside groups of 32: the last tile is partly past K) and
K = 576 = 4·128 + 64 for QQQ's grouped W4A8 (a ragged last group).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qcompile.backends.triton import wa_linear as T  # noqa: E402
from qcompile.ops.registry import implementation  # noqa: E402
from qcompile.quant.packing import pack_int4_weight, pack_int8_blocked  # noqa: E402
from qcompile.quant.rtn import dequantize_ref  # noqa: E402

Q = torch.ops.qcompile
N = 37
A8, A4 = (-128, 127), (-8, 7)


def _reference_quant(x, grid, symmetric):
    scale, zp = Q.choose_qparams_per_token(x, *grid, symmetric)
    return Q.quantize(x, scale, zp, *grid, 0), scale, zp


def _activations(m, k, dtype, seed, lead=()):
    """Random rows with an outlier channel (the per-token scale is set by it) and a positive shift
    (asymmetric zero points far from 0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=gen) + 0.7
    x[..., k // 3] *= 9.0
    return x.to(dtype)


def _weight(k, bits, group_size, seed, dtype=torch.float32):
    """(registry storage w, w_scale, q int8 [N, K]): full-range random q, positive scales in dtype.
    4-bit with a block-sized group is MatMulNBits-packed as fold_qdq packs it; else int8 q."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (N, k), generator=gen, dtype=torch.int8)
    groups = 1 if group_size == 0 else -(-k // group_size)
    scale = (torch.rand(N, groups, generator=gen) * 0.02 + 0.001).to(dtype)
    if bits == 4 and group_size >= 16:
        return pack_int4_weight(q, group_size), scale, q, 4
    return q, scale, q, 8


def _bound(xq, xs, xz, q, ws, group_size, bias, ref):
    """|kernel − reference| allowed, elementwise. Both sides rest on the exact integer products; the
    reference rounds x̂ and ŵ to the dtype (u_d each) and sums K products in fp32 (≤ K·u₃₂·Σ|x̂ŵ|,
    the standard dot-product bound), the kernel rounds only its fp32 epilogue (int32 → fp32, two
    scales, the bias, G partial sums for groups); both round the output to the dtype (u_d·|y|)."""
    dtype = ref.dtype
    u_d, u32 = torch.finfo(dtype).eps / 2, torch.finfo(torch.float32).eps / 2
    k = q.shape[1]
    groups = ws.shape[1]
    zp = xz if xz is not None else torch.zeros_like(xs, dtype=torch.int8)
    x_hat = dequantize_ref(xq, xs.double(), zp, 0)
    w_hat = dequantize_ref(q, ws.double(), torch.zeros(ws.shape, dtype=torch.int8), group_size)
    mag = x_hat.abs() @ w_hat.abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    return (2 * u_d + (k + groups + 8) * u32) * mag + 2 * u_d * ref.double().abs()


def _assert_within(out, ref, bound):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.double() - ref.double()).abs()
    worst = float((err / bound).max())
    assert worst <= 1.0, f"max error {float(err.max()):.3g} is {worst:.2f}× the rounding bound"


def _run_prepared(impl, args):
    return impl.op(**impl.prepare(args))


# ---- the activation quantizer: bit for bit ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("grid", "symmetric"), [(A8, True), (A8, False), (A4, True), (A4, False)])
def test_quantize_per_token_is_bit_exact(dtype, grid, symmetric):
    x = _activations(17, 97, dtype, seed=1)
    x[2] = 0.0  # an all-zero row: scale 1, exact zeros
    # a row whose scale is exactly 1 for every grid: x / s lands on .5 ties (round half to even)
    half = (grid[1] - grid[0]) / 2
    x[3] = torch.arange(97, dtype=torch.float32).remainder(9) - 4.5
    x[3, 0], x[3, 1] = half, -half
    xq, scale, zp = T.quantize_per_token(x, *grid, symmetric)
    ref_q, ref_s, ref_z = _reference_quant(x, grid, symmetric)
    assert xq.dtype == torch.int8 and scale.dtype == dtype and zp.dtype == torch.int8
    assert torch.equal(scale, ref_s) and torch.equal(zp, ref_z)
    assert torch.equal(xq, ref_q)


def test_quantize_per_token_keeps_leading_dims():
    x = _activations(3, 96, torch.float32, seed=2, lead=(2,))
    xq, scale, zp = T.quantize_per_token(x, *A8, False)
    ref_q, ref_s, ref_z = _reference_quant(x, A8, False)
    assert xq.shape == (2, 3, 96) and scale.shape == (2, 3, 1)
    assert torch.equal(xq, ref_q) and torch.equal(scale, ref_s) and torch.equal(zp, ref_z)


# ---- the integer accumulator: exact --------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize(("k", "layout"), [(96, "int8"), (97, "nibbles"), (96, "matmulnbits")])
def test_int_accumulator_is_exact(m, k, layout):
    gen = torch.Generator().manual_seed(m * k)
    xq = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    xq[0, :4] = -128  # the extremes of both operands meet
    if layout == "int8":
        q = torch.randint(-128, 128, (N, k), generator=gen, dtype=torch.int8)
        q[:, :4] = -128
        w, bits = q, 8
    else:
        q = torch.randint(-8, 8, (N, k), generator=gen, dtype=torch.int8)
        q[:, :4] = -8
        w = T.pack_nibbles(q) if layout == "nibbles" else pack_int4_weight(q, 32).reshape(N, -1)
        bits = 4
    acc = T.int_mm(xq, w, bits, k)
    assert acc.dtype == torch.int32
    assert torch.equal(acc, xq.long().matmul(q.long().T).int())


# ---- qlinear_wa against the registry reference --------------------------------------------------------

# (w_bits, group_size, K, activation grid, activation zero point: None | "token" | "tensor", dtype)
CASES = {
    "w8a8": (8, 0, 96, A8, None, torch.float32),
    "w8a8-asym-token": (8, 0, 96, A8, "token", torch.float32),
    "w8a8-asym-tensor": (8, 0, 96, A8, "tensor", torch.float32),
    "w8a8-fp16": (8, 0, 96, A8, None, torch.float16),
    "w8a8-bf16-asym": (8, 0, 96, A8, "token", torch.bfloat16),
    "w8a8-g64-ragged": (8, 64, 96, A8, "token", torch.float32),
    "w4a8-g128-qqq": (4, 128, 576, A8, None, torch.float32),
    "w4a8-g32-asym": (4, 32, 96, A8, "token", torch.float32),
    "w4a4-g128-one-ragged-group": (4, 128, 96, A4, None, torch.float32),  # QuaRot's W4A4 grid, K < g
    "w4a4-per-channel": (4, 0, 96, A4, None, torch.float32),
    "w4a4-per-channel-asym": (4, 0, 97, A4, "token", torch.float16),
}


def _quantized_call(case, m, bias, seed=0):
    """The registry op's argument dict for one case (activations quantized by the reference ops)."""
    bits, g, k, grid, zp_kind, dtype = CASES[case]
    x = _activations(m, k, dtype, seed=seed + m)
    if zp_kind == "tensor":  # static per tensor: a calibrated range, a 0-d scale and zero point
        lo, hi = float(x.min()), float(x.max())
        xs = torch.tensor((hi - lo) / 255, dtype=dtype)
        xz = torch.tensor(-128 - round(lo / float(xs)), dtype=torch.int8)
        xq = Q.quantize(x, xs, xz, *grid, 0)
    else:
        xq, xs, xz = _reference_quant(x, grid, zp_kind is None)
        xz = None if zp_kind is None else xz
    w, ws, q, w_bits = _weight(k, bits, g, seed=seed + k + g, dtype=dtype)
    b = (torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 0.1).to(dtype) if bias else None
    args = dict(
        xq=xq, x_scale=xs, x_zero_point=xz, w=w, w_scale=ws, w_zero_point=None, bias=b,
        w_bits=w_bits, in_features=k, group_size=g,
    )  # fmt: skip
    return args, x, q


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("m", "bias"), [(1, True), (3, False), (17, True)])
def test_qlinear_wa_matches_reference(case, m, bias):
    args, _, q = _quantized_call(case, m, bias)
    ref = Q.qlinear_wa(*args.values())
    out = _run_prepared(T.QLINEAR_WA_IMPL, args)
    bound = _bound(args["xq"], args["x_scale"], args["x_zero_point"], q, args["w_scale"], args["group_size"],
                   args["bias"], ref)  # fmt: skip
    _assert_within(out, ref, bound)


def test_the_bound_catches_a_one_unit_weight_error():
    """The tolerance is tight enough to fail: one weight value off by one step is outside it."""
    args, _, q = _quantized_call("w8a8", 3, True)
    ref = Q.qlinear_wa(*args.values())
    wrong = dict(args, w=q.clone())
    wrong["w"][5, 7] += 1 if wrong["w"][5, 7] < 127 else -1
    out = _run_prepared(T.QLINEAR_WA_IMPL, wrong)
    bound = _bound(args["xq"], args["x_scale"], None, q, args["w_scale"], 0, args["bias"], ref)
    with pytest.raises(AssertionError, match="rounding bound"):
        _assert_within(out, ref, bound)


def test_qlinear_wa_keeps_leading_dims_and_per_token_layout():
    args, _, q = _quantized_call("w8a8-asym-token", 3, True)
    args3 = dict(args)
    for key in ("xq", "x_scale", "x_zero_point"):
        args3[key] = args[key].reshape(1, 3, -1)
    out = _run_prepared(T.QLINEAR_WA_IMPL, args3)
    assert out.shape == (1, 3, N)
    assert torch.equal(out[0], _run_prepared(T.QLINEAR_WA_IMPL, args))


def test_an_empty_batch_launches_nothing():
    args, x, _ = _quantized_call("w8a8-asym-token", 3, True)
    empty = {k: (v[:0] if k in ("xq", "x_scale", "x_zero_point") else v) for k, v in args.items()}
    assert _run_prepared(T.QLINEAR_WA_IMPL, empty).shape == (0, N)
    xq, scale, zp = T.quantize_per_token(x[:0], *A8, True)
    assert xq.shape == (0, 96) and scale.shape == zp.shape == (0, 1)


# ---- the fused quantize + GEMM ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "m"),
    [("w8a8", 3), ("w8a8-asym-token", 17), ("w8a8-bf16-asym", 1), ("w4a8-g128-qqq", 3),
     ("w4a8-g32-asym", 3), ("w4a4-per-channel-asym", 17)],
)  # fmt: skip
def test_dyn_quant_linear_equals_quantize_then_qlinear_wa(case, m):
    """One launch gives the very numbers of the unfused pair (the same integers, the same fp32
    epilogue), and so the reference's up to the bound."""
    args, x, q = _quantized_call(case, m, bias=True)
    grid, symmetric = CASES[case][3], CASES[case][4] is None
    fused_args = {k: v for k, v in args.items() if k not in ("xq", "x_scale", "x_zero_point")}
    fused_args.update(x=x, qmin=grid[0], qmax=grid[1], symmetric=symmetric)
    assert T.supports_dyn_quant_linear(fused_args, x.device) is None
    fused = _run_prepared(T.DYN_QUANT_LINEAR_IMPL, fused_args)

    xq, xs, xz = T.quantize_per_token(x, *grid, symmetric)
    unfused = _run_prepared(
        T.QLINEAR_WA_IMPL, dict(args, xq=xq, x_scale=xs, x_zero_point=None if symmetric else xz)
    )
    assert torch.equal(fused, unfused)
    ref = Q.qlinear_wa(*args.values())
    bound = _bound(args["xq"], args["x_scale"], args["x_zero_point"], q, args["w_scale"], args["group_size"],
                   args["bias"], ref)  # fmt: skip
    _assert_within(fused, ref, bound)


# ---- registration, prepare, supports ---------------------------------------------------------------------


def test_registered_for_qlinear_wa_and_prepare_passes_runtime_inputs_through():
    assert implementation("triton", "qlinear_wa") is T.QLINEAR_WA_IMPL
    args, _, q = _quantized_call("w4a4-per-channel-asym", 3, True)
    prepared = T.prepare_qlinear_wa(args)
    for key in ("xq", "x_scale", "x_zero_point", "bias"):
        assert prepared[key] is args[key]
    # an int4-valued int8 weight is packed to nibbles; its column sums serve the zero point
    assert prepared["w_bits"] == 4 and prepared["w"].dtype == torch.uint8 and prepared["w"].shape == (N, 49)
    assert torch.equal(prepared["w_colsum"], q.int().sum(1).int())
    # 8-bit full-range weights stay int8; MatMulNBits int4 is read as is
    args8, _, _ = _quantized_call("w8a8", 1, False)
    assert T.prepare_qlinear_wa(args8)["w"] is not None and T.prepare_qlinear_wa(args8)["w_bits"] == 8
    args4, _, _ = _quantized_call("w4a8-g128-qqq", 1, False)
    assert torch.equal(T.prepare_qlinear_wa(args4)["w"], args4["w"].reshape(N, -1))


def test_supports_says_why_not():
    args, _, q = _quantized_call("w8a8", 1, False)
    cpu = torch.device("cpu")
    assert T.supports_qlinear_wa(args, cpu) is None
    scale = args["w_scale"]
    cases = {
        "asymmetric weights": dict(w_zero_point=torch.zeros_like(scale, dtype=torch.int8)),
        "not a multiple of 32": dict(group_size=48, w_scale=scale.expand(N, 2)),
        "weight-only storage": dict(w=pack_int8_blocked(q[:, :64], 32), in_features=64, group_size=32),
        "could overflow": dict(in_features=70000),
        "w_bits=2": dict(w_bits=2),
        "neither per token": dict(x_scale=torch.ones(1, 96)),
    }
    for why, change in cases.items():
        reason = T.supports_qlinear_wa(dict(args, **change), cpu)
        assert reason is not None and why in reason, (why, reason)
    assert "CUDA" in T.supports_qlinear_wa(args, torch.device("meta"))
    fused = {k: v for k, v in args.items() if k not in ("xq", "x_scale", "x_zero_point")}
    fused.update(x=None, qmin=0, qmax=255, symmetric=False)
    assert "signed int8 grid" in T.supports_dyn_quant_linear(fused, cpu)


def test_gpu_configs_are_pruned_to_tiles_inside_one_group(monkeypatch):
    """On the GPU a K tile must not straddle two weight groups, and a one-token problem gets no
    128-row tiles; the per-channel case (GROUP_SIZE = K) takes any K tile."""
    from qcompile.backends.triton import wa_kernels

    monkeypatch.setattr(wa_kernels, "INTERPRET", False)
    configs = [wa_kernels._gemm_config(bm, 64, bk, 4, 3) for bm in (16, 128) for bk in (32, 64, 96, 256)]

    def kept(group, k, m_bucket):
        args = {"GROUP_SIZE": group, "K": k, "M_BUCKET": m_bucket}
        return {
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) for c in wa_kernels._prune_gemm_configs(configs, args)
        }

    assert kept(128, 576, 1) == {(16, 32), (16, 64)}
    assert kept(128, 576, 256) == {(16, 32), (16, 64), (128, 32), (128, 64)}
    assert kept(576, 576, 256) == {(bm, bk) for bm in (16, 128) for bk in (32, 64, 96, 256)}


def test_wrappers_name_the_kernel_and_the_problem(monkeypatch):
    args, x, _ = _quantized_call("w8a8-asym-token", 3, True)
    p = T.prepare_qlinear_wa(args)

    def call(**change):
        return T.qlinear_wa(**dict(p, **change))

    with pytest.raises(ValueError, match=r"qcompile_triton::qlinear_wa: xq must be int8"):
        call(xq=p["xq"].float())
    with pytest.raises(ValueError, match=r"qlinear_wa: xq must be \[\.\.\., in_features=96\]"):
        call(xq=p["xq"][:, :64])
    with pytest.raises(ValueError, match=r"qlinear_wa: w_scale must be float32 \[N=37, G=1\]"):
        call(w_scale=p["w_scale"].half())
    with pytest.raises(ValueError, match=r"qlinear_wa: w for w_bits=4 must be torch.uint8"):
        call(w_bits=4)
    with pytest.raises(ValueError, match=r"qlinear_wa: bias must be a float \[N=37\]"):
        call(bias=p["bias"][:5])
    with pytest.raises(ValueError, match=r"qlinear_wa: x_scale must be per token \[3, 1\]"):
        call(x_scale=p["x_scale"][:2])
    with pytest.raises(ValueError, match=r"qlinear_wa: x_zero_point must be int8"):
        call(x_zero_point=p["x_zero_point"].int())
    with pytest.raises(ValueError, match=r"qlinear_wa: w_colsum must be int32 \[N=37\]"):
        call(w_colsum=p["w_colsum"].long())
    with pytest.raises(ValueError, match=r"qlinear_wa: per-channel weights with an activation zero point"):
        call(w_colsum=None)
    with pytest.raises(ValueError, match=r"qlinear_wa: group_size must be 0 or a multiple of 32"):
        call(group_size=48, w_scale=p["w_scale"].expand(N, 2).contiguous())
    with pytest.raises(
        ValueError, match=r"qlinear_wa: tensors are on different devices \(xq on cpu, w on meta\)"
    ):
        T._check_device("qlinear_wa", {"xq": p["xq"], "w": p["w"].to("meta")})
    with pytest.raises(ValueError, match=r"dyn_quant_linear: qmin/qmax must be a signed int8 grid"):
        T.dyn_quant_linear(x, 0, 255, False, p["w"], p["w_scale"], p["w_colsum"], None, 8, 96, 0)
    with pytest.raises(ValueError, match=r"quantize_per_token: x must be float32/float16/bfloat16"):
        T.quantize_per_token(x.double(), -128, 127, True)
    from qcompile.backends.triton import common

    monkeypatch.setattr(common, "INTERPRET", False)  # CPU tensors without the interpreter
    with pytest.raises(
        ValueError, match=r"quantize_per_token: Triton kernels run on CUDA devices .*not on cpu"
    ):
        T.quantize_per_token(x, -128, 127, True)


def test_fakes_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, x, _ = _quantized_call("w8a8-bf16-asym", 3, True)
    p = T.prepare_qlinear_wa(args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x.reshape(1, 3, -1))
        out = T.DYN_QUANT_LINEAR(
            fx, -128, 127, False, p["w"], p["w_scale"], p["w_colsum"], p["bias"], 8, 96, 0
        )
        xq, s, z = T.QUANTIZE_PER_TOKEN(fx, -128, 127, False)
        y = T.QLINEAR_WA(xq, s, z, p["w"], p["w_scale"], p["w_colsum"], p["bias"], 8, 96, 0)
    assert out.shape == y.shape == (1, 3, N) and out.dtype == y.dtype == torch.bfloat16
    assert (
        xq.shape == (1, 3, 96) and xq.dtype == torch.int8 and s.shape == (1, 3, 1) and z.dtype == torch.int8
    )


# ---- without a GPU: the kernels compile for Hopper/Ampere and trace under torch.compile ----------------

_COMPILE_AND_TRACE = r"""
import os, re
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qcompile.backends.triton import wa_kernels, wa_linear as T

ptr = {"a_ptr": "*i8", "xs_ptr": "*fp16", "xz_ptr": "*i8", "w_ptr": "*i8", "ws_ptr": "*fp32",
       "wcs_ptr": "*i32", "b_ptr": "*fp16", "out_ptr": "*fp16"}
ints = ["M", "N", "K", "KW", "M_BUCKET", "GROUP_SIZE", "stride_am", "stride_xs", "stride_wn", "stride_wsn",
        "stride_om"]
flags = ["W4", "GROUPED", "HAS_XZP", "HAS_BIAS", "FUSE_QUANT", "SYMMETRIC", "INT_OUT"]
aligned = ["a_ptr", "xs_ptr", "xz_ptr", "w_ptr", "ws_ptr", "wcs_ptr", "b_ptr", "out_ptr", "N", "K", "KW",
           "stride_am", "stride_wn", "stride_om"]  # what the launcher's divisibility-16 specialisation sees
for cap, (bm, bn, bk, warps, stages), (w4, grouped, xzp, fuse, sym) in [
    (90, (128, 128, 64, 8, 3), (False, False, True, False, True)),  # W8A8 asym, wgmma
    (90, (16, 32, 256, 4, 3), (True, True, False, True, True)),  # fused W4A8 g128, decode tile
    (80, (64, 128, 32, 4, 4), (True, True, True, True, False)),  # fused asym grouped, mma.sync
]:
    sig = dict(ptr, **{n: "i32" for n in ints}, HALF_RANGE="fp32", RANGE="fp32", QMIN="i32", QMAX="i32")
    sig.update({n: "constexpr" for n in flags + ["BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"]})
    if w4:
        sig["w_ptr"] = "*u8"
    if fuse:
        sig["a_ptr"] = "*bf16"
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    consts = dict(zip(flags, (w4, grouped, xzp, True, fuse, sym, False)), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                  GROUP_M=8)
    k = triton.compile(ASTSource(wa_kernels._wa_gemm_kernel.fn, sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = k.asm["ptx"]
    mma = "wgmma.mma_async" if (cap == 90 and bm >= 64) else "mma.sync"
    assert re.search(re.escape(mma) + r".*s8", ptx), f"no int8 {mma} for sm_{cap} {consts}"
    assert "cp.async" in ptx, f"loads not pipelined for sm_{cap} {consts}"
    print("compiled", cap, consts)

from qcompile.backends.triton import common
common.INTERPRET = True  # CPU tensors past the wrapper's device check: this only traces, nothing launches
graphs = []

def backend(gm, example_inputs):
    graphs.append(gm.code)
    return gm.forward

x = torch.randn(3, 96)
w = torch.randint(-128, 128, (37, 96), dtype=torch.int8)
ws = torch.rand(37, 1)
from torch._dynamo.backends.common import aot_autograd
f = torch.compile(lambda x: T.DYN_QUANT_LINEAR(x, -128, 127, True, w, ws, None, None, 8, 96, 0),
                  backend=aot_autograd(fw_compiler=backend), dynamic=True, fullgraph=True)
try:
    f(x)
except Exception:
    pass  # running the traced graph needs a GPU; the graph is what this checks
assert graphs and "triton_kernel_wrapper_functional" in graphs[0], graphs
assert re.search(r"'M_BUCKET': arg\d+_1", graphs[0]), "a dynamic M must stay symbolic in the kernel call"
print("traced")
"""


@pytest.mark.slow
def test_kernels_compile_for_gpus_and_trace_without_one(tmp_path):
    """No GPU needed: the GEMM compiles to int8 MMA PTX with pipelined loads for sm_90 (wgmma) and
    sm_80, and torch.compile traces the fused op into Triton's kernel wrapper with a symbolic M —
    what the interpreter (which runs kernels eagerly) cannot show. ~1 min."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_AND_TRACE], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "traced" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


# ---- on a folded graph: the KernelImpl contract with real fold_qdq arguments --------------------------

_SCHEMA = ["xq", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "bias", "w_bits", "in_features",
           "group_size"]  # fmt: skip


@pytest.mark.slow  # ~3 s in the full suite (the capture is shared); alone, the capture adds 10-20 s
@pytest.mark.parametrize(
    "scheme",
    [{"act_symmetric": False}, {"weight_bits": 4, "group_size": 32}],
    ids=["w8a8-asym-act", "w4a8-g32"],
)
def test_every_qlinear_wa_of_a_folded_tiny_llama(tiny_decoder, scheme):
    """quantize → fold_qdq on the tiny Llama's decode step (the session's capture, copied), then each
    ``qlinear_wa`` call as a lowering would make it: ``supports`` on the node's arguments (constants
    as tensors, runtime inputs as fx nodes), ``prepare``, and the Triton op on the values the
    reference graph computed ([batch, seq, K] activations, [batch, seq, 1] scales) — within the
    rounding bound of the reference's output."""
    from qcompile.frontend.decoder import example_decoder_inputs
    from qcompile.ir import keys
    from qcompile.ops import QLINEAR_WA
    from qcompile.passes.analyze import AnalyzePass
    from qcompile.passes.annotate import AnnotatePass
    from qcompile.passes.fold_qdq import FoldQDQPass
    from qcompile.passes.quantize import QuantizePass
    from qcompile.pipeline.contract import PassContext
    from qcompile.quant.packing import weight_int8

    qg = tiny_decoder.copy()
    ctx = PassContext(show_progress=False)
    for p in (AnalyzePass(), AnnotatePass(scheme), QuantizePass(), FoldQDQPass()):
        p(qg, ctx)
    calls = []

    def record(*args):
        out = QLINEAR_WA(*args)
        calls.append((args, out))
        return out

    nodes = [n for n in qg.graph.nodes if n.target is QLINEAR_WA]
    assert nodes
    for node in nodes:
        node.target = record
    qg.recompile()
    qg(*example_decoder_inputs(qg.info[keys.INFO_DECODER], batch=2, past=4, seq=3))
    assert len(calls) == len(nodes)
    seen = set()  # one call per weight shape (q, k, gate, down): the others repeat them
    for node, (values, ref) in zip(nodes, calls, strict=True):
        if tuple(values[3].shape) in seen:
            continue
        seen.add(tuple(values[3].shape))
        graph_args = {
            name: qg.get_constant(a) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a
            for name, a in zip(_SCHEMA, node.args, strict=True)
        }
        assert T.supports_qlinear_wa(graph_args, torch.device("cpu")) is None, node.name
        kwargs = T.prepare_qlinear_wa(graph_args)
        runtime = dict(zip(_SCHEMA, values, strict=True))
        kwargs = {k: runtime[k] if isinstance(v, torch.fx.Node) else v for k, v in kwargs.items()}
        out = T.QLINEAR_WA(**kwargs)
        a = runtime
        q, _ = weight_int8(a["w"], a["w_scale"], None, a["w_bits"], a["in_features"])
        bound = _bound(
            a["xq"], a["x_scale"], a["x_zero_point"], q, a["w_scale"], a["group_size"], a["bias"], ref
        )
        _assert_within(out, ref, bound)
