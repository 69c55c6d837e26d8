"""Hadamard matrices, fallbacks and the qcompile::hadamard op (docs/methods.md "Rotation", docs/architecture.md ops).

Every K-matrix is checked exactly in integers; transforms against the dense matrix; SmolLM2's sizes
(576 = 36·16, 1536 = 12·128, 9 heads) against the documented, reported behaviour.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from qcompile.ops.hadamard import HADAMARD, hadamard_op_call_args
from qcompile.quant import hadamard as had
from qcompile.quant import hadamard_k

METHODS_K = {1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172}


def _randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _assert_orthogonal(m: torch.Tensor, atol: float = 1e-12) -> None:
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    torch.testing.assert_close(m.double() @ m.double().T, eye, rtol=0, atol=atol)


# --- the K-matrices ------------------------------------------------------------------------------


def test_every_k_of_methods_is_supported():
    assert set(had.SUPPORTED_K) == METHODS_K


@pytest.mark.parametrize("k", sorted(METHODS_K))
def test_k_matrix_is_hadamard_exactly(k):
    h = hadamard_k.k_matrix(k)
    assert h.dtype == torch.int64 and h.shape == (k, k)
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.int64))


def test_k_matrix_is_a_copy():
    h = hadamard_k.k_matrix(12)
    h.zero_()
    assert bool((hadamard_k.k_matrix(12) != 0).all())


@pytest.mark.parametrize("q", [11, 13, 25, 27])
def test_jacobsthal_matrix_properties(q):
    """Q Qᵀ = qI − J, rows sum to 0, Q symmetric iff q ≡ 1 (mod 4) else skew — incl. GF(25), GF(27)."""
    jac = torch.tensor(hadamard_k.jacobsthal(q))
    ones = torch.ones(q, q, dtype=torch.int64)
    assert torch.equal(jac @ jac.T, q * torch.eye(q, dtype=torch.int64) - ones)
    assert bool((jac.sum(1) == 0).all())
    assert torch.equal(jac.T, jac if q % 4 == 1 else -jac)


def test_paley_i_over_gf27_is_hadamard():
    """The field code beyond what the table uses: 28 also = Paley I over GF(27)."""
    h = torch.tensor(hadamard_k.paley_i(27))
    assert torch.equal(h @ h.T, 28 * torch.eye(28, dtype=torch.int64))


def test_williamson_sequences_autocorrelations_cancel():
    seqs = hadamard_k.williamson_sequences(43, 6)
    for s in seqs:
        assert s[0] == 1 and all(s[i] == s[-i] for i in range(1, 43))  # symmetric
    pafs = [hadamard_k._periodic_autocorrelation(s) for s in seqs]
    assert all(sum(p[s] for p in pafs) == 0 for s in range(42))


# --- dense matrices --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "factor"),
    [(576, (36, 16)), (1536, (12, 128)), (9, None), (80, (40, 2)), (64, (1, 64)), (13696, None), (3, None)],
)
def test_hadamard_factor(n, factor):
    assert had.hadamard_factor(n) == factor


@pytest.mark.parametrize("n", [1, 2, 4, 24, 28, 40, 64, 80, 256, 344, 576, 1536])
def test_hadamard_matrix_is_orthogonal_and_scaled_pm1(n):
    h = had.hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    _assert_orthogonal(h)
    torch.testing.assert_close((h * n**0.5).abs(), torch.ones(n, n, dtype=torch.float64))


def test_hadamard_matrix_kronecker_convention():
    """H_n = H_K ⊗ H_{2^m} (K outer), so the fast transform's [..., K, 2^m] view is the right one."""
    h = had.hadamard_matrix(24) * 24**0.5
    expected = torch.kron(hadamard_k.k_matrix(12), torch.tensor([[1, 1], [1, -1]])).double()
    assert torch.equal(h.round(), expected)


def test_hadamard_matrix_error_names_size_and_supported_sizes():
    with pytest.raises(had.HadamardError, match=r"order 9: supported sizes are n = K·2\^m with K in \{1, 12"):
        had.hadamard_matrix(9)


# --- random rotations ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [had.random_hadamard_matrix, had.random_orthogonal_matrix])
def test_random_rotations_are_orthogonal_seeded_and_leave_global_rng(make):
    state = torch.get_rng_state()
    a, b, c = make(96, 0), make(96, 0), make(96, 1)
    assert torch.equal(torch.get_rng_state(), state)
    _assert_orthogonal(a)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert make(20, 3, dtype=torch.float32).dtype == torch.float32


def test_random_hadamard_is_hadamard_times_sign_diagonal():
    r, h = had.random_hadamard_matrix(48, 7), had.hadamard_matrix(48)
    signs = (r / h)[0]
    assert set(signs.round().tolist()) == {1.0, -1.0}
    torch.testing.assert_close(r, h @ torch.diag(signs), rtol=0, atol=0)


# --- SmolLM2's sizes: what happens is deliberate and reported -------------------------------------


@pytest.mark.parametrize(("n", "text"), [(576, "576 = 36·16"), (1536, "1536 = 12·128")])
def test_smollm2_hidden_and_intermediate_are_exact(n, text):
    q, desc = had.offline_rotation(n, seed=0)
    assert desc.startswith(f"random Hadamard {text}") and "seed 0" in desc
    _assert_orthogonal(q)
    plan = had.online_plan(n)
    assert (plan.kind, plan.block, plan.description.split(" (")[0]) == ("exact", n, f"Hadamard {text}")


def test_smollm2_nine_heads_offline_is_random_orthogonal():
    q, desc = had.offline_rotation(9, seed=0)
    assert desc == "random orthogonal (QR, seed 0): no Hadamard of order 9"
    _assert_orthogonal(q)
    assert torch.equal(q, had.random_orthogonal_matrix(9, 0))


def test_smollm2_nine_heads_online_is_identity_unless_padding_allowed():
    plan = had.online_plan(9)
    assert (plan.kind, plan.block, plan.is_identity) == ("block_diagonal", 1, True)
    assert plan.description.startswith("identity (no rotation possible): no Hadamard of order 9")
    x = _randn(4, 9)
    assert torch.equal(had.hadamard_transform(x, plan), x)

    padded = had.online_plan(9, allow_padding=True)
    assert (padded.kind, padded.block, padded.out_features) == ("padded", 12, 12)
    assert "zero-padded by 3 to 12" in padded.description
    expected = torch.nn.functional.pad(x, (0, 3)) @ had.hadamard_matrix(12)
    torch.testing.assert_close(had.hadamard_transform(x, padded), expected, rtol=0, atol=1e-12)


# --- fast transforms vs dense ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
def test_fwht_matches_sylvester(n, dtype):
    x = _randn(3, 5, n, dtype=dtype)
    sylvester = had.sylvester_matrix(n).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(had.fwht(x, normalize=False), x @ sylvester, rtol=tol, atol=tol * n**0.5)
    torch.testing.assert_close(had.fwht(x), x @ had.hadamard_matrix(n, dtype), rtol=tol, atol=tol)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(had.HadamardError, match="power of two, got 12"):
        had.fwht(torch.zeros(12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [24, 80, 112, 156, 344, 576, 1536])
def test_hadamard_transform_matches_dense(n, dtype):
    plan = had.online_plan(n)
    assert plan.kind == "exact"
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for shape in [(3, 5, n), (n,)]:
        x = _randn(*shape, dtype=dtype, seed=n)
        y = had.hadamard_transform(x, plan)
        assert y.dtype == dtype
        torch.testing.assert_close(y, x @ had.hadamard_matrix(n, dtype), rtol=tol, atol=tol)


def test_hadamard_transform_half_precision_computes_in_float32():
    x = _randn(2, 576, dtype=torch.float32)
    y = had.hadamard_transform(x.bfloat16(), had.online_plan(576))
    assert y.dtype == torch.bfloat16
    reference = had.hadamard_transform(x.bfloat16().float(), had.online_plan(576))
    torch.testing.assert_close(y, reference.bfloat16(), rtol=0, atol=0)


def test_block_diagonal_plan_matches_dense_block_diagonal():
    plan = had.online_plan(704)  # 11·64: no Hadamard of order 704, 44, 88, …; 64 is the largest block
    assert (plan.kind, plan.block, plan.num_blocks) == ("block_diagonal", 64, 11)
    assert plan.description == "block-diagonal Hadamard, 11 blocks of 64 = 2^6: no Hadamard of order 704"
    dense = torch.block_diag(*[had.hadamard_matrix(64)] * 11)
    torch.testing.assert_close(had.plan_matrix(plan), dense, rtol=0, atol=0)
    x = _randn(3, 704)
    torch.testing.assert_close(had.hadamard_transform(x, plan), x @ dense, rtol=0, atol=1e-12)


def test_llama_style_13696_block_diagonal_or_padded():
    plan = had.online_plan(13696)  # 107·128, 107 prime
    assert (plan.kind, plan.block, plan.num_blocks) == ("block_diagonal", 128, 107)
    padded = had.online_plan(13696, allow_padding=True)
    assert (padded.kind, padded.block, padded.k) == ("padded", 13824, 108)


def test_transform_checks_width_and_plan_consistency():
    with pytest.raises(had.HadamardError, match="last dim 10 does not match the plan's width 12"):
        had.hadamard_transform(torch.zeros(10), had.online_plan(12))
    with pytest.raises(had.HadamardError, match="inconsistent"):
        had.OnlineHadamardPlan(24, "block_diagonal", 24, 12, "")
    with pytest.raises(had.HadamardError, match="K = 12"):
        had.plan_from_op_args(40, 40, 12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("n", [1024, 1536])
def test_fast_transform_never_builds_an_n_by_n_matrix(n):
    x = _randn(2, n, dtype=torch.float32)
    with _LargestTensor() as fast:
        had.hadamard_transform(x, had.online_plan(n))
    assert fast.largest <= 2 * n  # only x-sized tensors (and the K×K matrix)
    with _LargestTensor() as dense:  # the probe does see a dense path: this test can fail
        x @ had.hadamard_matrix(n, torch.float32)
    assert dense.largest >= n * n


# --- the qcompile::hadamard op --------------------------------------------------------------------


@pytest.mark.parametrize(("n", "allow_padding"), [(576, False), (704, False), (9, True), (9, False)])
def test_op_matches_reference_and_fake_shape(n, allow_padding):
    plan = had.online_plan(n, allow_padding)
    args = hadamard_op_call_args(plan)
    assert had.plan_from_op_args(*args) == plan
    x = _randn(2, 3, n, dtype=torch.float32)
    y = torch.ops.qcompile.hadamard(x, *args)
    assert torch.equal(y, had.hadamard_transform(x, plan)) and y.shape == (2, 3, plan.out_features)
    with FakeTensorMode() as mode:
        fake = torch.ops.qcompile.hadamard(mode.from_tensor(x), *args)
    assert fake.shape == y.shape and fake.dtype == torch.float32


class _RotateThenProject(torch.nn.Module):
    def __init__(self, plan: had.OnlineHadamardPlan):
        super().__init__()
        self.args = hadamard_op_call_args(plan)
        self.proj = torch.nn.Linear(plan.out_features, 4)

    def forward(self, x):
        return self.proj(torch.ops.qcompile.hadamard(x, *self.args))


def test_op_exports_with_dynamic_batch():
    plan = had.online_plan(1536)
    module = _RotateThenProject(plan).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(module, (_randn(3, 1536, dtype=torch.float32),), dynamic_shapes=({0: batch},))
    nodes = [n for n in ep.graph.nodes if n.target is HADAMARD]
    assert len(nodes) == 1 and tuple(nodes[0].args[1:]) == (1536, 1536, 12)
    x = _randn(5, 1536, dtype=torch.float32, seed=1)
    torch.testing.assert_close(ep.module()(x), module(x))
    dense = module.proj(x @ had.hadamard_matrix(1536, torch.float32))  # the exporter's MatMul mapping
    torch.testing.assert_close(ep.module()(x), dense, rtol=1e-4, atol=1e-4)
