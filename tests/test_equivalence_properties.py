"""Property tests for the equivalence engine: random shapes, random T, outputs unchanged.

Random positive scales are log-uniform over [1e-2, 1e2]; random orthogonal maps are the Q of a seeded
QR. Tolerance as in test_equivalence.py: ``max|after − before| ≤ 1e-5 · max|before|`` (fp32), except
for ``diag(1/s)·Q``, whose fp32 intermediate is conditioned by max(s)/min(s) (so s ∈ [1/4, 4] there).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from qcompile.equivalence import (
    EquivalenceError,
    apply_diagonal,
    apply_orthogonal,
    apply_scaled_orthogonal,
    region_for_linear_pair,
    region_for_norm,
    region_for_up_down,
    region_for_v_o,
    residual_region,
)
from qcompile.tools.models import tiny_llama
from tests.test_equivalence import (
    TOL,
    NormMLP,
    WeightlessStream,
    capture,
    log_uniform,
    output,
    random_orthogonal,
)

FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def close(ref: torch.Tensor, got: torch.Tensor, what: str) -> None:
    err, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert err <= TOL * scale, f"{what}: max abs error {err:.3g} vs output scale {scale:.3g}"


@FEW
@given(
    dim=st.integers(2, 24),
    hidden=st.integers(2, 32),
    relu=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_norm_mlp_random_shapes(dim: int, hidden: int, relu: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, dim, generator=gen)
    qg, structure = capture(NormMLP(dim, hidden, nn.ReLU() if relu else None, seed), x)
    ref = output(qg, x)
    fc1, fc2 = sorted(structure.linears)
    work = qg.copy()
    norm = next(iter(structure.norms))
    apply_diagonal(work, region_for_norm(work.info["structure"], norm), log_uniform(dim, gen), "smooth")
    close(ref, output(work, x), "norm → fc1, diag(1/s)")
    pair = region_for_linear_pair(work.info["structure"], fc1, [fc2])
    apply_diagonal(work, pair, log_uniform(hidden, gen), "smooth")
    close(ref, output(work, x), "fc1 → fc2, diag(1/s)")
    # Rotations start from the unsmoothed graph: rotating channels just scaled by up to 1e4 apart is the
    # badly conditioned diag(1/s)·Q case (fp32 intermediate), not a property of the merge.
    q = random_orthogonal(hidden, gen)
    rotated = qg.copy()
    pair = region_for_linear_pair(rotated.info["structure"], fc1, [fc2])
    if relu:  # ReLU passes positive diagonals only
        try:
            apply_orthogonal(rotated, pair, q, "rotate")
        except EquivalenceError as exc:
            assert exc.node == "relu"
        else:
            raise AssertionError("an orthogonal map passed ReLU")
        return
    apply_orthogonal(rotated, pair, q, "rotate")
    close(ref, output(rotated, x), "fc1 → fc2, Q")
    apply_scaled_orthogonal(
        rotated, pair, log_uniform(hidden, gen, 0.25, 4.0), random_orthogonal(hidden, gen), "rotate"
    )
    close(ref, output(rotated, x), "fc1 → fc2, diag(1/s)·Q")


@FEW
@given(
    dim=st.integers(2, 24),
    hidden=st.integers(2, 24),
    layers=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_weightless_stream_random_rotation(dim: int, hidden: int, layers: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (2, 5), generator=gen)
    qg, structure = capture(WeightlessStream(32, dim, hidden, layers, seed), ids)
    work = qg.copy()
    report = apply_orthogonal(
        work, residual_region(work.info["structure"]), random_orthogonal(dim, gen), "rotate"
    )
    close(output(qg, ids), output(work, ids), "residual stream, Q")
    assert len([c for c in report.changes if c.roles == ["producer rows"]]) == layers


def _random_llama(head_dim: int, num_kv_heads: int, group: int, intermediate: int, seed: int):
    heads = num_kv_heads * group
    model = tiny_llama(
        seed,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        vocab_size=64,
    )
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(seed))
    # Static shapes: 4× faster to export; the unit tests cover dynamic batch/sequence.
    return (*capture(model, ids, dynamic=False), ids)


def _smooth_and_rotate_heads(
    work, head_dim: int, num_kv_heads: int, group: int, gen
) -> list[tuple[str, object]]:
    """Each step modifies ``work`` in place and returns its report; regions come from the current Structure."""
    st_ = work.info["structure"]
    att, mlp = st_.attentions[0], st_.mlps[0]
    hidden, inter = att.num_heads * head_dim, st_.linears[mlp.up].out_features
    s_kv = log_uniform(num_kv_heads * head_dim, gen)
    per_o_column = s_kv.reshape(num_kv_heads, 1, head_dim).expand(-1, group, -1).reshape(-1)  # tied per group
    h_per_kv = torch.stack([random_orthogonal(head_dim, gen) for _ in range(num_kv_heads)])
    # H before the v→o scales: rotating channels already scaled up to 1e4 apart is diag(1/s)·Q's
    # ill-conditioned fp32 case; scaling rotated channels is not.
    return [
        (
            "norm → q,k,v",
            lambda: apply_diagonal(
                work, region_for_norm(st_, att.input_norm), log_uniform(hidden, gen), "smooth"
            ),
        ),
        (
            "norm → gate,up",
            lambda: apply_diagonal(
                work, region_for_norm(st_, mlp.input_norm), log_uniform(hidden, gen), "smooth"
            ),
        ),
        (
            "up → down",
            lambda: apply_diagonal(work, region_for_up_down(st_, mlp), log_uniform(inter, gen), "smooth"),
        ),
        ("v → o per-KV-head H", lambda: apply_orthogonal(work, region_for_v_o(st_, att), h_per_kv, "rotate")),
        (
            "v → o diag tied per group",
            lambda: apply_diagonal(work, region_for_v_o(st_, att), per_o_column, "smooth"),
        ),
    ]


@FEW
@given(
    head_dim=st.sampled_from([2, 4, 8]),
    num_kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    intermediate=st.integers(4, 40),
    seed=st.integers(0, 2**16),
)
def test_llama_random_heads(
    head_dim: int, num_kv_heads: int, group: int, intermediate: int, seed: int
) -> None:
    qg, structure, ids = _random_llama(head_dim, num_kv_heads, group, intermediate, seed)
    gen = torch.Generator().manual_seed(seed)
    ref, work = output(qg, ids), qg.copy()
    for what, step in _smooth_and_rotate_heads(work, head_dim, num_kv_heads, group, gen):
        step()
        close(ref, output(work, ids), what)
    # R1 needs weightless norms: on a copy with every γ = 1 (its own baseline).
    base = qg.copy()
    for norm in structure.norms.values():
        base.set_constant(norm.weight, torch.ones_like(base.get_constant(norm.weight)))
    rotated = base.copy()
    hidden = num_kv_heads * group * head_dim
    apply_orthogonal(
        rotated, residual_region(rotated.info["structure"]), random_orthogonal(hidden, gen), "rotate"
    )
    close(output(base, ids), output(rotated, ids), "residual stream, Q")
