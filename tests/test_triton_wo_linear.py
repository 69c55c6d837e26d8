"""The Triton weight-only linear (``backends/triton/wo_linear.py``, layout in ``layout.py``) against the
registry's reference ``qcompile::qlinear_w``, on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest before triton is imported).

Shapes are small (the interpreter runs each program in Python) but cover what the kernels branch on:
M = 1 and 3 (split-K GEMV, with and without the reduction pass, a padded row block) and 17 (GEMM);
ragged groups (K = 576 = 4·128 + 64, K = 96 = 64 + 32, K = 100 = 3·32 + 4 with a half-used int32
word); odd N = 37 (a partial n tile); groups smaller than the K tile (32) or not dividing it (48,
plain int8): a scale row per K row; per-channel int8; int4, int8 blocked and plain;
symmetric and asymmetric; bias or not; fp32, fp16, bf16.

Tolerances. The kernel's dequantized Ŵ is bit-identical to the reference's (same integer ``q - zp``,
one fp32 multiply by the scale, one rounding to the scale's dtype), so the outputs differ only by
the order of the fp32 accumulation:

- fp32: ``|out - ref| <= 1e-5 · (|ref| + max|ref|)``. Two fp32 sums of the same K products, rounded
  in different orders, differ by at most ~K·ε·Σ|x_k w_k| and in practice by a random walk of ~√K
  roundings: for K ≤ 576, √576·ε ≈ 3e-6 of the terms' magnitude (ε = 1.2e-7; measured ≤ 5e-7 of
  max|ref|). A wrong nibble, group index or scale row errs by ≥ 1e-3.
- fp16 / bf16: one unit in the last place of the output's scale, ``eps(dtype) · (|ref| + max|ref|)``:
  both sides accumulate in fp32 and round once to the half type (CPU's addmm may round before adding
  the bias: ≤ ½ ulp more).
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from qcompile.backends.triton import layout  # noqa: E402
from qcompile.ops import QLINEAR_W, KernelImpl  # noqa: E402
from qcompile.ops.registry import implementation  # noqa: E402
from qcompile.quant import packing  # noqa: E402

N_ODD = 37


@pytest.fixture(scope="module")
def wo_linear():
    """The kernel module, imported by the first test that uses it, not at collection: importing it
    registers the ``"triton"`` backend in the op registry, and the checked-in docs/ops.md (compared by
    tests/test_docs.py, which runs earlier) has no triton column yet."""
    from qcompile.backends.triton import wo_linear

    return wo_linear


def quantized_linear(n, k, bits, group, asym, dtype, storage, seed=0):
    """qcompile-packed ``(w, w_scale, w_zero_point)`` of a random full-range quantized weight."""
    gen = torch.Generator().manual_seed(seed)
    groups = layout.num_groups(k, group)
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    q = torch.randint(lo, hi + 1, (n, k), generator=gen).to(torch.int8)
    scale = (torch.rand(n, groups, generator=gen) * 0.05 + 0.005).to(dtype)
    zp = torch.randint(lo, hi + 1, (n, groups), generator=gen).to(torch.int8) if asym else None
    if bits == 4:
        return packing.pack_int4_weight(q, group), scale, packing.pack_int4_zero_point(zp) if asym else None
    if storage == "blocked":
        zp_u = (zp.to(torch.int16) + packing.UINT8_OFFSET).to(torch.uint8) if asym else None
        return packing.pack_int8_blocked(q, group), scale, zp_u
    return q, scale, zp


def qlinear_args(x, n, k, bits, group, asym, bias, storage, seed=0):
    w, scale, zp = quantized_linear(n, k, bits, group, asym, x.dtype, storage, seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(x.dtype) if bias else None
    return {
        "x": x,
        "w": w,
        "w_scale": scale,
        "w_zero_point": zp,
        "bias": b,
        "w_bits": bits,
        "in_features": k,
        "group_size": group,
    }


def assert_matches_reference(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.numel() == 0:
        return
    tol = 1e-5 if ref.dtype == torch.float32 else torch.finfo(ref.dtype).eps
    err = (out.float() - ref.float()).abs()
    bound = tol * (ref.float().abs() + ref.float().abs().max())
    assert bool((err <= bound).all()), (
        f"max error {err.max():.3e} (bound at that element {bound.flatten()[err.argmax()]:.3e})"
    )


def run_triton(args):
    from qcompile.backends.triton import wo_linear  # noqa: F401  (registers the implementation)

    impl = implementation("triton", QLINEAR_W)
    assert impl.supports(args, args["x"].device) is None
    return impl.op(**impl.prepare(args))


CASES = [  # (M, K, bits, group, asym, bias, dtype, int8 storage)
    (1, 576, 4, 128, False, True, torch.float32, None),  # GEMV, K split in 2 + reduction pass
    (3, 576, 4, 128, True, False, torch.float32, None),  # GEMV, 3 of a 4-row block
    (17, 576, 4, 128, True, True, torch.float32, None),  # GEMM, ragged last group of 64
    (17, 96, 4, 64, False, False, torch.float32, None),  # GEMM, ragged 64 + 32
    (1, 96, 8, 64, True, True, torch.float32, "blocked"),  # GEMV, one split: fused epilogue
    (3, 96, 8, 64, False, True, torch.float32, "plain"),
    (17, 576, 8, 128, False, False, torch.float32, "blocked"),
    (17, 96, 8, 0, True, True, torch.float32, "plain"),  # per output channel
    (17, 96, 8, 48, True, False, torch.float32, "plain"),  # a group that is no power of two
    (3, 100, 4, 32, True, True, torch.float32, None),  # K % 8 = 4: the last int32 word half used
    (3, 576, 4, 32, True, True, torch.bfloat16, None),  # groups smaller than the K tile
    (17, 576, 4, 32, True, True, torch.bfloat16, None),
    (3, 96, 8, 64, True, True, torch.float16, "blocked"),
    (17, 96, 4, 64, True, True, torch.float16, None),
]


@pytest.mark.parametrize(("m", "k", "bits", "group", "asym", "bias", "dtype", "storage"), CASES)
def test_qlinear_w_matches_reference(m, k, bits, group, asym, bias, dtype, storage):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)
    args = qlinear_args(x, N_ODD, k, bits, group, asym, bias, storage)
    assert_matches_reference(run_triton(args), QLINEAR_W(**args))


@pytest.mark.parametrize("lead", [(2, 3), (3, 6), (0,)], ids=["gemv", "gemm", "empty"])
def test_leading_dims_and_row_stride(lead):
    """x [..., K] with a row stride of 2K (a slice), through both paths, and M = 0."""
    k = 96
    x = torch.randn(*lead, 2 * k, generator=torch.Generator().manual_seed(3))[..., :k]
    args = qlinear_args(x, N_ODD, k, 4, 64, True, True, None)
    out = run_triton(args)
    assert out.shape == (*lead, N_ODD)
    assert_matches_reference(out, QLINEAR_W(**args))


def test_split_k_heuristic(wo_linear):
    """The GEMV's K slices align with the tiles, stay within the cap and the partials' traffic bound,
    and the test shapes do take both GEMV branches (split + reduction, and one split)."""
    cpu = torch.device("cpu")
    for m, n, k, bits in [(1, 37, 576, 4), (8, 4096, 4096, 4), (1, 576, 1536, 8), (8, 11008, 4096, 4)]:
        chunk = wo_linear.split_k_chunk(m, n, k, bits, cpu)
        splits = math.ceil(k / chunk)
        assert chunk % wo_linear.SPLIT_ALIGN == 0 and 1 <= splits <= wo_linear.MAX_SPLIT_K
        assert splits == 1 or 2 * 4 * splits * m * n <= (n * k * bits / 8) / 4  # partials <= 1/4 of weights
    assert math.ceil(576 / wo_linear.split_k_chunk(1, N_ODD, 576, 4, cpu)) > 1
    assert math.ceil(96 / wo_linear.split_k_chunk(1, N_ODD, 96, 8, cpu)) == 1


def test_gpu_autotune_configs_and_pruning(wo_linear):
    """The GPU's config lists (the interpreter runs one config) and their pruning, with the autotuner's
    calling convention: positional arguments as a dict, the rest as keywords."""
    gemm = wo_linear.gemm_configs(interpret=False)
    small = wo_linear.prune_gemm_configs(gemm, {}, M_BUCKET=16)
    assert small and len(small) < len(gemm) and all(c.kwargs["BLOCK_M"] <= 16 for c in small)
    assert wo_linear.prune_gemm_configs(gemm, {"M_BUCKET": 256}) == gemm
    gemv = wo_linear.gemv_configs(interpret=False)
    assert len(gemv) > 1 and all(wo_linear.SPLIT_ALIGN % c.kwargs["BLOCK_K"] == 0 for c in gemv)


# ---- layout ---------------------------------------------------------------------------------------------


def test_int4_word_order():
    """8 values along K per int32, low nibble first: u = 1..8 is the word 0x87654321."""
    u = torch.arange(1, 9, dtype=torch.int16).reshape(1, 8)
    word = layout.pack_int4_words(u)
    assert word.shape == (1, 1) and word.dtype == torch.int32
    assert int(word) == 0x87654321 - 2**32
    assert torch.equal(layout.unpack_int4_words(word, 8), u)


@pytest.mark.parametrize(
    ("bits", "group", "storage"), [(4, 128, None), (4, 32, None), (8, 64, "blocked"), (8, 0, "plain")]
)
@pytest.mark.parametrize("asym", [False, True])
def test_repack_round_trip(bits, group, storage, asym):
    """The kernels' layout holds the very (q, zero point) of qcompile's storage, ragged K included."""
    k = 576 if group != 64 else 96
    w, scale, zp = quantized_linear(9, k, bits, group, asym, torch.float32, storage)
    packed = layout.repack_weight(w, scale, zp, bits, k, group)
    q_ref, zp_ref = packing.weight_int8(w, scale, zp, bits, k)
    q, zp_k = layout.unpack_weight(packed)
    assert torch.equal(q, q_ref) and torch.equal(zp_k, zp_ref)
    assert torch.equal(packed.scales, scale.t())
    assert packed.w.is_contiguous() and packed.w.shape[1] == 9
    assert packed.w.dtype == (torch.int32 if bits == 4 else torch.int8)


# ---- the wrapper's and supports' errors -------------------------------------------------------------------


def _kernel_inputs(wo_linear):
    x = torch.randn(2, 96)
    kw = wo_linear.prepare_qlinear_w(qlinear_args(x, N_ODD, 96, 4, 64, True, True, None))
    return kw


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda kw: kw.update(w_bits=3), "w_bits must be 4 or 8"),
        (lambda kw: kw.update(x=kw["x"].to(torch.int32)), "x must be float16, bfloat16 or float32"),
        (lambda kw: kw.update(x=torch.randn(2, 95)), "in_features = 96"),
        (lambda kw: kw.update(x=torch.randn(96, 2).t()), "last dim must be contiguous"),
        (
            lambda kw: kw.update(w=packing.pack_int4_weight(torch.zeros(N_ODD, 96, dtype=torch.int8), 64)),
            "repack_weight",
        ),
        (lambda kw: kw.update(scales=kw["scales"].half()), "must be x's"),
        (lambda kw: kw.update(scales=kw["scales"][:1]), "scales must be"),
        (lambda kw: kw.update(zeros=kw["zeros"].to(torch.int32)), "zeros must be None or int8"),
        (lambda kw: kw.update(bias=kw["bias"][:5]), "bias must be None"),
        (lambda kw: kw.update(scales=kw["scales"].t().contiguous().t()), "scales must be contiguous"),
    ],
)
def test_wrapper_errors_name_the_kernel(wo_linear, change, message):
    kw = _kernel_inputs(wo_linear)
    change(kw)
    with pytest.raises(ValueError, match="qcompile_triton::qlinear_w") as info:
        wo_linear.QLINEAR_W_TRITON(**kw)
    assert message in str(info.value)


def test_wrapper_device_errors(wo_linear):
    """Checked in the wrapper (a meta tensor among the op's inputs dispatches to the fake instead)."""
    kw = _kernel_inputs(wo_linear)
    with pytest.raises(ValueError, match="qcompile_triton::qlinear_w: bias is on meta, x on cpu"):
        wo_linear.check_inputs(**{**kw, "bias": kw["bias"].to("meta")})
    kw = {key: v.to("meta") if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
    with pytest.raises(ValueError, match="qcompile_triton::qlinear_w: Triton kernels run on CUDA"):
        wo_linear.check_inputs(**kw)


def test_supports(wo_linear):
    impl = implementation("triton", QLINEAR_W)
    assert isinstance(impl, KernelImpl) and impl.op is wo_linear.QLINEAR_W_TRITON
    args = qlinear_args(torch.randn(1, 96), N_ODD, 96, 4, 64, True, True, None)
    # The runtime input as a lowering pass hands it over: an fx node with its meta["val"].
    node = torch.fx.Graph().placeholder("x")
    node.meta["val"] = torch.empty(1, 96)
    args["x"] = node
    assert impl.supports(args, torch.device("cpu")) is None
    assert impl.supports(args, torch.device("cuda")) is None
    assert "CUDA" in impl.supports(args, torch.device("meta"))
    assert "w_bits 2" in impl.supports({**args, "w_bits": 2}, torch.device("cpu"))
    node.meta["val"] = torch.empty(1, 96, dtype=torch.float16)
    assert "float16" in impl.supports(args, torch.device("cpu"))
    node.meta["val"] = torch.empty(1, 96)
    bad = {**args, "w": args["w"][:, :1]}  # one group where 96 / 64 needs two
    assert "weight storage" in impl.supports(bad, torch.device("cpu"))
    prepared = impl.prepare(args)
    assert prepared["x"] is node and prepared["w"].dtype == torch.int32


def test_fake_shapes(wo_linear):
    """The fake gives the output shape under FakeTensorMode (no kernel runs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kw = _kernel_inputs(wo_linear)
    with FakeTensorMode() as mode:
        fake = {key: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
        fake["x"] = mode.from_tensor(torch.randn(4, 5, 96))
        out = wo_linear.QLINEAR_W_TRITON(**fake)
    assert out.shape == (4, 5, N_ODD) and out.dtype == torch.float32
