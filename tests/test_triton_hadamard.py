"""The Triton online Hadamard (``backends/triton/hadamard.py``) against the registry's reference
``qcompile::hadamard`` (:func:`qcompile.quant.hadamard.hadamard_transform`), on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest).

Plans: exact powers of two, exact ``K·2^m`` (SmolLM2's 576 = 36·16 and 1536 = 12·128), K alone
(12 = 12·1, no FWHT stage), a pinned K (40 = 20·2 and 40·1 are different matrices), block-diagonal
(power-of-two and K blocks), zero-padded (9 → 12, 100 → 128).

Tolerances. Every output is a ±1 combination of one segment's inputs times 1/√block; the kernel
adds in a different order from the reference (the K mix first, then a constant-geometry FWHT; the
reference runs the FWHT with stride-h pairs first), so in fp32 the two differ by a few roundings of
sums of (log₂ P + K) terms: bounded by ``1e-5 · (|ref| + max|ref|)`` (measured ≤ 3e-7 of max|ref|;
a wrong sign, pairing or K row is O(1)). In fp16 / bf16 both compute in fp32 and round once:
``eps(dtype) · (|ref| + max|ref|)``.
"""

import pytest
import torch

pytest.importorskip("triton")

from qcompile.ops import HADAMARD, KernelImpl  # noqa: E402
from qcompile.ops.registry import implementation  # noqa: E402
from qcompile.quant.hadamard import online_plan, plan_from_op_args, plan_matrix  # noqa: E402


@pytest.fixture(scope="module")
def hadamard():
    """The kernel module, imported by the first test that uses it, not at collection: importing it
    registers the ``"triton"`` backend in the op registry, and the checked-in docs/ops.md (compared by
    tests/test_docs.py, which runs earlier) has no triton column yet."""
    from qcompile.backends.triton import hadamard

    return hadamard


def assert_matches_reference(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = 1e-5 if ref.dtype == torch.float32 else torch.finfo(ref.dtype).eps
    err = (out.float() - ref.float()).abs()
    bound = tol * (ref.float().abs() + ref.float().abs().max())
    assert bool((err <= bound).all()), f"max error {err.max():.3e}"


def run_triton(x, n, block, k):
    from qcompile.backends.triton import hadamard  # noqa: F401  (registers the implementation)

    impl = implementation("triton", HADAMARD)
    args = {"x": x, "n": n, "block": block, "k": k}
    assert impl.supports(args, x.device) is None
    return impl.op(**impl.prepare(args))


PLANS = [  # (n, block, k, dtype)
    (64, 64, 1, torch.float32),  # 2^6
    (576, 576, 36, torch.float32),  # 36·16, SmolLM2's hidden size
    (1536, 1536, 12, torch.float32),  # 12·128, SmolLM2's intermediate size
    (12, 12, 12, torch.float32),  # K alone: no FWHT stage
    (40, 40, 20, torch.float32),  # 20·2 ...
    (40, 40, 40, torch.float32),  # ... and 40·1: the pinned K decides
    (96, 32, 1, torch.float32),  # block-diagonal, 3 blocks of 2^5
    (48, 12, 12, torch.float32),  # block-diagonal, 4 blocks of K = 12
    (9, 12, 12, torch.float32),  # padded 9 -> 12, output 12 wide
    (100, 128, 1, torch.float32),  # padded 100 -> 128
    (576, 576, 36, torch.bfloat16),
    (96, 32, 1, torch.float16),
]


@pytest.mark.parametrize(("n", "block", "k", "dtype"), PLANS)
def test_hadamard_matches_reference(n, block, k, dtype):
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    assert_matches_reference(run_triton(x, n, block, k), HADAMARD(x, n, block, k))


def test_hadamard_is_the_dense_matrix():
    """Independently of the reference transform: x @ plan_matrix, in float64, for 576 = 36·16."""
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(1))
    out = run_triton(x, 576, 576, 36)
    dense = (x.double() @ plan_matrix(plan_from_op_args(576, 576, 36))).float()
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_online_plans_and_row_stride():
    """Plans as the rotate pass makes them, on x with a row stride (a slice of a wider tensor)."""
    for n, padding in [(24, False), (9, True), (18, False)]:  # exact 12·2, padded, 9 blocks of 2
        plan = online_plan(n, allow_padding=padding)
        x = torch.randn(4, 2 * n, generator=torch.Generator().manual_seed(n))[:, :n]
        assert_matches_reference(
            run_triton(x, plan.n, plan.block, plan.k), HADAMARD(x, plan.n, plan.block, plan.k)
        )


def test_empty_rows():
    x = torch.randn(0, 64)
    assert run_triton(x, 64, 64, 1).shape == (0, 64)


# ---- errors and supports ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "n", "block", "k", "message"),
    [
        (torch.randn(2, 9), 9, 1, 1, "identity plan"),
        (torch.randn(2, 10), 10, 10, 1, "no online Hadamard plan"),
        (torch.randn(2, 32), 64, 64, 1, "last dim must be n = 64"),
        (torch.randn(2, 64).to(torch.int32), 64, 64, 1, "x must be float16"),
        (torch.randn(64, 2).t(), 64, 64, 1, "last dim must be contiguous"),
        (torch.randn(2, 2**15), 2**15, 2**15, 1, "register tile"),
    ],
)
def test_wrapper_errors_name_the_kernel(hadamard, x, n, block, k, message):
    h_k = torch.ones(k, k)
    with pytest.raises(ValueError, match="qcompile_triton::hadamard") as info:
        hadamard.HADAMARD_TRITON(x, h_k, n, block, k)
    assert message in str(info.value)


def test_wrong_k_matrix_is_refused(hadamard):
    with pytest.raises(
        ValueError, match=r"qcompile_triton::hadamard: h_k must be the contiguous float32 \[12, 12\]"
    ):
        hadamard.HADAMARD_TRITON(torch.randn(2, 24), torch.ones(12, 12, dtype=torch.float64), 24, 24, 12)


def test_supports(hadamard):
    impl = implementation("triton", HADAMARD)
    assert isinstance(impl, KernelImpl) and impl.op is hadamard.HADAMARD_TRITON
    node = torch.fx.Graph().placeholder("x")
    node.meta["val"] = torch.empty(1, 576)
    args = {"x": node, "n": 576, "block": 576, "k": 36}
    cpu = torch.device("cpu")
    assert impl.supports(args, cpu) is None
    assert "CUDA" in impl.supports(args, torch.device("meta"))
    assert "identity plan" in impl.supports({**args, "n": 9, "block": 1, "k": 1}, cpu)
    assert "register tile" in impl.supports({**args, "n": 2**15, "block": 2**15, "k": 1}, cpu)
    assert "not an online Hadamard plan" in impl.supports({**args, "k": 12}, cpu)
    node.meta["val"] = torch.empty(1, 576, dtype=torch.int8)
    assert "torch.int8" in impl.supports(args, cpu)
    prepared = impl.prepare(args)
    assert prepared["x"] is node and prepared["h_k"].shape == (36, 36)


def test_gpu_autotune_pruning(hadamard):
    """The GPU's configs (the interpreter runs one) pruned by tile size, registers per thread and rows,
    with the autotuner's calling convention (the constexprs arrive as keywords)."""
    gpu = hadamard.configs(interpret=False)
    mid = hadamard.prune_configs(gpu, {"ROWS_BUCKET": 1024}, KP=64, P=16)  # 576 = 36·16
    assert (
        mid and len(mid) < len(gpu) and all(c.kwargs["BLOCK_ROWS"] * 1024 <= hadamard.MAX_TILE for c in mid)
    )
    big = hadamard.prune_configs(gpu, {"ROWS_BUCKET": 1024}, KP=256, P=64)  # 11008 = 172·64
    assert big and all(c.kwargs["BLOCK_ROWS"] == 1 and c.num_warps >= 4 for c in big)
    few = hadamard.prune_configs(gpu, {"ROWS_BUCKET": 2}, KP=1, P=64)
    assert few and all(c.kwargs["BLOCK_ROWS"] <= 2 for c in few)


def test_fake_shapes(hadamard):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(3, 4, 9))
        out = hadamard.HADAMARD_TRITON(x, mode.from_tensor(torch.ones(12, 12)), 9, 12, 12)
    assert out.shape == (3, 4, 12)
