"""Quantizer math: scale rules, round-trip error bounds, ragged groups, clip search, activations, SQNR."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile import ops  # noqa: F401  (registers torch.ops.qcompile)
from qcompile.quant.rtn import (
    clip_objective,
    expand_groups,
    fake_quant_activation,
    fake_quant_per_tensor,
    fake_quant_per_token,
    quantize_weight,
    sqnr_db,
    static_per_tensor_qparams,
)
from qcompile.quant.scheme import ActQuantSpec, WeightQuantSpec, qrange, scheme_string

Q = torch.ops.qcompile


def _within_half_step(w: torch.Tensor, qw, rel: float = 1e-6) -> bool:
    """|w - ŵ| ≤ scale/2 everywhere, plus the rounding (relative ``rel``) of ŵ = (q - zp)·scale."""
    scale = expand_groups(qw.scale, qw.group_size, w.shape[-1]).float()
    return bool(((w.float() - qw.dequantize().float()).abs() <= scale / 2 + rel * w.float().abs()).all())


@settings(max_examples=30, deadline=None)
@given(
    out_f=st.integers(1, 9),
    in_f=st.integers(1, 200),
    group=st.sampled_from([0, 16, 32, 64, 128]),
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    shift=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_is_at_most_half_a_step(out_f, in_f, group, bits, symmetric, shift, seed):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) + shift
    qw = quantize_weight(w, WeightQuantSpec(bits, symmetric, group))
    qmin, qmax = qrange(bits)
    assert qw.q.dtype == torch.int8 and qw.q.shape == w.shape
    assert int(qw.q.min()) >= qmin and int(qw.q.max()) <= qmax
    assert qw.scale.shape == (out_f, math.ceil(in_f / group) if group else 1)
    assert _within_half_step(w, qw)
    # the offline quantize step is exactly what the qcompile::quantize op computes
    assert torch.equal(qw.q, Q.quantize(w, qw.scale, qw.zero_point, qmin, qmax, qw.group_size))


@pytest.mark.parametrize(("bits", "divisor"), [(4, 7.5), (8, 127.5)])
def test_symmetric_scale_rule(bits, divisor):
    """scale = absmax / ((qmax - qmin) / 2): -absmax lands on qmin, +absmax is clamped to qmax."""
    w = torch.tensor([[-3.0, 1.0, 0.5, 2.0], [1.5, -0.5, 0.25, 1.5]])
    qw = quantize_weight(w, WeightQuantSpec(bits, True, 0))
    torch.testing.assert_close(qw.scale, torch.tensor([[3.0], [1.5]]) / divisor)
    qmin, qmax = qrange(bits)
    assert qw.q[0, 0] == qmin and qw.q[1, 0] == qmax and (qw.zero_point == 0).all()


def test_asymmetric_range_contains_zero_and_zero_is_exact():
    w = torch.tensor([[0.5, 1.0, 2.0, 3.5], [-4.0, -1.0, 0.0, 1.0]])
    qw = quantize_weight(w, WeightQuantSpec(4, False, 0))
    torch.testing.assert_close(qw.scale, torch.tensor([[3.5 / 15], [5.0 / 15]]))
    assert qw.zero_point[0, 0] == -8  # all-positive row: min widened to 0 → 0 maps to qmin
    assert qw.dequantize()[1, 2] == 0.0
    assert _within_half_step(w, qw)


@pytest.mark.parametrize(("in_f", "group", "widths"), [(576, 128, [128] * 4 + [64]), (48, 32, [32, 16])])
def test_ragged_last_group_has_its_own_scale(in_f, group, widths):
    w = torch.randn(3, in_f, generator=torch.Generator().manual_seed(1))
    w[:, -1] = 10.0  # an outlier in the last (ragged) group must not widen the other groups
    qw = quantize_weight(w, WeightQuantSpec(4, True, group))
    assert qw.scale.shape == (3, len(widths)) and qw.group_size == group
    starts = [sum(widths[:i]) for i in range(len(widths))]
    for k, (s, width) in enumerate(zip(starts, widths, strict=True)):
        absmax = w[:, s : s + width].abs().amax(-1)
        torch.testing.assert_close(qw.scale[:, k], absmax / 7.5)
    assert _within_half_step(w, qw)


def test_zero_rows_and_groups_quantize_to_exact_zeros():
    w = torch.zeros(2, 40)
    w[1, :8] = torch.linspace(-1, 1, 8)
    for symmetric in (True, False):
        qw = quantize_weight(w, WeightQuantSpec(4, symmetric, 16))
        assert torch.equal(qw.dequantize()[0], torch.zeros(40)) and torch.equal(
            qw.dequantize()[1, 16:], torch.zeros(24)
        )
        assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()


def test_low_precision_weights_keep_their_dtype():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    qw = quantize_weight(w, WeightQuantSpec(4, False, 32))
    assert qw.scale.dtype == torch.bfloat16 and qw.dequantize().dtype == torch.bfloat16
    assert _within_half_step(w, qw, rel=2.0**-8)  # ŵ itself is rounded to bfloat16


def test_more_bits_and_smaller_groups_are_more_accurate():
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(2))
    db = {
        spec.short(): sqnr_db(w, quantize_weight(w, spec).dequantize())
        for spec in (
            WeightQuantSpec(8),
            WeightQuantSpec(4),
            WeightQuantSpec(4, True, 128),
            WeightQuantSpec(4, True, 32),
        )
    }
    assert db["w8cs"] > db["w4g32s"] > db["w4g128s"] > db["w4cs"]
    assert db["w8cs"] > 38.0  # ≈ 6.02·8 − 10·log10(absmax²/(3σ²)) for Gaussian rows of 576


def _objective(w, qw, h=None):
    d = (w - qw.dequantize()).unsqueeze(1)  # one "group" per row: the total error of the row
    return clip_objective(d, None if h is None else h.unsqueeze(0)).sum().item()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [0, 32])
def test_clip_search_never_increases_its_objective(symmetric, group):
    gen = torch.Generator().manual_seed(3)
    # Student-t rows (ν = 3, z / sqrt(χ²/ν)): heavy tails, where clipping should pay off.
    w = torch.randn(32, 96, generator=gen) / torch.randn(3, 32, 96, generator=gen).pow(2).mean(0).sqrt()
    x = torch.randn(200, 96, generator=gen) * torch.linspace(0.2, 3.0, 96)
    rtn = quantize_weight(w, WeightQuantSpec(4, symmetric, group))
    mse = quantize_weight(w, WeightQuantSpec(4, symmetric, group, clip_search=True))
    assert _objective(w, mse) <= _objective(w, rtn) * (1 + 1e-6)
    assert _objective(w, mse) < 0.97 * _objective(w, rtn)  # and it does help on heavy-tailed rows
    assert mse.clip_ratio is not None and (mse.clip_ratio <= 1).all() and (mse.clip_ratio < 1).any()
    out = quantize_weight(w, WeightQuantSpec(4, symmetric, group, clip_search=True), samples=x)
    if group == 0:  # per channel the objective is the exact output error ‖X (W - Ŵ)ᵀ‖²
        y = x @ w.T
        assert sqnr_db(y, x @ out.dequantize().T) >= sqnr_db(y, x @ rtn.dequantize().T) - 1e-9
    h = x.T @ x  # grouped: the per-group output error, summed
    d_rtn, d_out = ((w - q.dequantize()).view(32, -1, group or 96) for q in (rtn, out))
    blocks = torch.stack([h[i : i + (group or 96), i : i + (group or 96)] for i in range(0, 96, group or 96)])
    assert clip_objective(d_out, blocks).sum() <= clip_objective(d_rtn, blocks).sum() * (1 + 1e-6)
    xtx = quantize_weight(w, WeightQuantSpec(4, symmetric, group, clip_search=True), xtx=h.double())
    assert torch.equal(xtx.q, out.q)  # samples and their XᵀX give the same search


def test_clip_grid_must_contain_one():
    with pytest.raises(ValueError, match="1.0"):
        WeightQuantSpec(4, clip_search=True, clip_grid=(0.9, 0.8))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_activation_fake_quant_matches_the_ops_exactly(bits, symmetric):
    x = torch.randn(2, 7, 64) * torch.linspace(0.1, 5, 64)
    spec = ActQuantSpec(bits, "dynamic_per_token", symmetric)
    s, z = Q.choose_qparams_per_token(x, spec.qmin, spec.qmax, symmetric)
    via_ops = Q.dequantize(Q.quantize(x, s, z, spec.qmin, spec.qmax, 0), s, z, 0)
    assert torch.equal(fake_quant_per_token(x, spec), via_ops)
    assert torch.equal(fake_quant_activation(x, spec), via_ops)
    static = ActQuantSpec(bits, "static_per_tensor", symmetric)
    lo, hi = float(x.min()), float(x.max())
    s0, z0 = static_per_tensor_qparams(lo, hi, static)
    via_ops = Q.dequantize(Q.quantize(x, s0, z0, static.qmin, static.qmax, 0), s0, z0, 0)
    assert torch.equal(fake_quant_per_tensor(x, static, lo, hi), via_ops)
    assert s0.dim() == 0 and z0.dtype == torch.int8


def test_static_per_tensor_scale_and_clipping():
    spec = ActQuantSpec(8, "static_per_tensor")
    scale, zp = static_per_tensor_qparams(-2.0, 1.0, spec)
    assert scale.item() == pytest.approx(2.0 / 127.5) and zp.item() == 0
    x = torch.tensor([0.5, -1.0, 7.0])  # 7.0 is outside the calibrated range: clipped to qmax·scale
    y = fake_quant_activation(x, spec, (-2.0, 1.0))
    assert y[2].item() == pytest.approx(127 * 2.0 / 127.5)
    assert fake_quant_activation(x, ActQuantSpec(8, "none")) is x
    with pytest.raises(ValueError, match="calibrated range"):
        fake_quant_activation(x, spec)


def test_sqnr_db():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, 0.9 * x) == pytest.approx(20.0)
    assert sqnr_db(x, x + 0.01 * x.norm() / math.sqrt(1000) * torch.ones(1000)) > 30


def test_scheme_strings():
    assert scheme_string(WeightQuantSpec(8), ActQuantSpec(8)) == "w8cs-a8ts"
    assert scheme_string(WeightQuantSpec(4, True, 128), ActQuantSpec(mode="none")) == "w4g128s-a16"
    assert (
        scheme_string(WeightQuantSpec(4, False, 64, True), ActQuantSpec(4, "static_per_tensor"))
        == "w4g64a+clip-a4ps"
    )
    with pytest.raises(ValueError, match="act mode"):
        ActQuantSpec(8, "per_channel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        WeightQuantSpec(16)
