"""Calibration: statistics at every linear input equal a brute-force computation on the same batches,
memory stays bounded, data comes from the validation split only, and the pass fails clearly without it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
import qcompile.tools.data as qdata
from qcompile.ir import keys
from qcompile.pipeline.contract import PassContext, PassError, get_pass_class
from qcompile.quant.calibration import (
    CalibrationError,
    LinearInputObserver,
    calibrate,
    linear_nodes,
)
from qcompile.tools.data import calibration_batches
from qcompile.tools.models import ByteTokenizer


class TwoLinear(nn.Module):
    """``b(relu(a(x))) + c(x)``: ``a`` and ``c`` read the graph input itself, ``b`` a computed activation."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = nn.Linear(12, 20)
        self.b = nn.Linear(20, 6, bias=False)
        self.c = nn.Linear(12, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + self.c(x)


def _batches(shapes: list[tuple[int, int]], seed: int = 1) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, s, 12, generator=gen),) for b, s in shapes]


@pytest.fixture(scope="module")
def two_linear():
    model = TwoLinear().eval()
    qg = qcompile.capture(model, (torch.randn(2, 5, 12),))
    return model, qg


def _eager_inputs(model: nn.Module, batches: list[tuple]) -> dict[str, torch.Tensor]:
    """Brute force: every row each nn.Linear read, in order, via forward pre-hooks on the eager model."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        mod.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0]))
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
    ]
    with torch.no_grad():
        for (x,) in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {name: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]) for name, ts in seen.items()}


def _by_module(qg, stats):
    return {keys.get(n)[keys.MODULE]: stats[n.name] for n in linear_nodes(qg) if n.name in stats}


def test_stats_match_brute_force(two_linear):
    model, qg = two_linear
    batches = _batches([(2, 7), (1, 9), (3, 4)])
    stats = calibrate(qg, batches, hessian=True, sample_rows=10, progress=False)
    rows = _eager_inputs(model, batches)
    by_module = _by_module(qg, stats)
    assert set(by_module) == {"a", "b", "c"}
    for name, s in by_module.items():
        x = rows[name]
        assert s.n_tokens == x.shape[0] == 2 * 7 + 9 + 3 * 4
        torch.testing.assert_close(s.channel_absmax, x.abs().amax(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.channel_min, x.amin(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.channel_max, x.amax(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.token_absmax, x.abs().amax(1), rtol=1e-6, atol=1e-6)
        assert s.tensor_absmax == pytest.approx(float(x.abs().max()), rel=1e-6)
        x64 = x.double()
        torch.testing.assert_close(s.xtx, x64.T @ x64, rtol=1e-9, atol=1e-9)
        assert s.xtx.dtype == torch.float64 and s.channel_absmax.dtype == torch.float32
        # Samples are real input rows, at the positions they claim, without repeats.
        assert s.samples.shape == (10, x.shape[1])
        assert s.sample_index.unique().numel() == 10
        torch.testing.assert_close(s.samples, x[s.sample_index], rtol=1e-6, atol=1e-6)
    # Every linear with the same row count samples the same token positions.
    assert torch.equal(by_module["a"].sample_index, by_module["b"].sample_index)
    # Linears reading the same node are observed once: own stats objects, shared tensors.
    a, c = by_module["a"], by_module["c"]
    assert a.node != c.node and a.channel_absmax is c.channel_absmax and a.samples is c.samples


def test_stats_on_node_meta_and_no_hessian_by_default(two_linear):
    _, qg = two_linear
    stats = calibrate(qg, _batches([(1, 6)]), progress=False)
    for node in linear_nodes(qg):
        assert keys.get(node)[keys.ACT_STATS] is stats[node.name]
        assert stats[node.name].xtx is None
    # A graph copy (instrument snapshots) shares the immutable stats instead of duplicating XᵀX.
    copy = qg.copy()
    assert all(keys.get(n)[keys.ACT_STATS] is stats[n.name] for n in linear_nodes(copy))
    assert "tokens=6" in repr(next(iter(stats.values())))
    # Fewer rows than the reservoir: every row is kept.
    assert all(s.samples.shape[0] == 6 for s in stats.values())


def test_sampling_is_seeded_bounded_and_spread(two_linear):
    _, qg = two_linear
    batches = _batches([(1, 40)] * 5)
    a = calibrate(qg, batches, sample_rows=16, seed=3, progress=False)
    b = calibrate(qg, batches, sample_rows=16, seed=3, progress=False)
    c = calibrate(qg, batches, sample_rows=16, seed=4, progress=False)
    for name in a:
        assert a[name].samples.shape[0] == 16  # bounded by sample_rows, not by 200 tokens
        assert torch.equal(a[name].sample_index, b[name].sample_index)
        assert torch.equal(a[name].samples, b[name].samples)
        assert not torch.equal(a[name].sample_index, c[name].sample_index)
        # A reservoir, not the first k rows: later batches are represented.
        assert int(a[name].sample_index.max()) >= 40


@pytest.mark.parametrize("k", [0, 1, 7, 30, 100])
def test_reservoir_keeps_exactly_the_rows_with_the_smallest_keys(k):
    """Smallest-k of i.i.d. uniform keys is a uniform sample without replacement, whatever the batching."""
    gen = torch.Generator().manual_seed(k)
    sizes = [5, 1, 17, 9, 30, 2]
    xs = [torch.randn(n, 3, generator=gen) for n in sizes]
    keys = [torch.rand(n, dtype=torch.float64, generator=gen) for n in sizes]
    obs = LinearInputObserver("x", 3, sample_rows=k)
    for x, key in zip(xs, keys, strict=True):
        obs.observe(x, key)
    stats = obs.finalize()
    want = torch.topk(torch.cat(keys), min(k, sum(sizes)), largest=False).indices.sort().values
    assert torch.equal(stats.sample_index, want)
    assert torch.equal(stats.samples, torch.cat(xs)[want])


def test_memory_is_bounded_by_state_not_activations(two_linear):
    """Only the per-token abs-max grows with the data (4 bytes a token); no activation is kept."""
    _, qg = two_linear
    one = calibrate(qg, _batches([(2, 30)]), sample_rows=8, hessian=True, progress=False)
    six = calibrate(qg, _batches([(2, 30)] * 6), sample_rows=8, hessian=True, progress=False)
    for name in one:
        assert six[name].nbytes() - one[name].nbytes() == 4 * (six[name].n_tokens - one[name].n_tokens)
    # The reservoir copies rows: it never holds a view that would pin a whole activation.
    obs = LinearInputObserver("x", 12, sample_rows=4)
    x = torch.randn(50, 12)
    obs.observe(x, torch.rand(50, dtype=torch.float64))
    assert obs._rows.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert obs._rows.untyped_storage().nbytes() == 4 * 12 * 4


def test_only_selected_linears(two_linear):
    _, qg = two_linear
    b = next(n.name for n in linear_nodes(qg) if keys.get(n)[keys.MODULE] == "b")
    assert list(calibrate(qg, _batches([(1, 3)]), linears=[b], progress=False)) == [b]
    with pytest.raises(CalibrationError, match="not linear node"):
        calibrate(qg, _batches([(1, 3)]), linears=["nope"], progress=False)


def test_progress_bar_can_be_turned_off(two_linear, capsys):
    _, qg = two_linear
    calibrate(qg, _batches([(1, 3)] * 2), progress=False)
    assert "calibrate" not in capsys.readouterr().err
    calibrate(qg, _batches([(1, 3)] * 2), progress=True)
    assert "calibrate" in capsys.readouterr().err


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    dim=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    negative=st.booleans(),
)
def test_scale_channels_matches_stats_of_scaled_input(n, dim, seed, negative):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen) * torch.rand(dim, generator=gen) * 10
    s = torch.rand(dim, generator=gen) * 4 + 0.25
    if negative:
        s[0] = -s[0]
    keys = torch.rand(n, dtype=torch.float64, generator=gen)
    obs, obs_scaled = (LinearInputObserver("x", dim, sample_rows=5, hessian=True) for _ in range(2))
    obs.observe(x, keys)
    obs_scaled.observe(x / s, keys)
    got, want = obs.finalize().scale_channels(s), obs_scaled.finalize()
    for field in ("channel_absmax", "channel_min", "channel_max", "samples"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6)
    # D xtx D is exact in float64 (``want`` saw x / s rounded to float32 first, so compare in float64).
    xs = x.double() / s.double()
    torch.testing.assert_close(got.xtx, xs.T @ xs, rtol=1e-10, atol=1e-10)
    assert torch.equal(got.sample_index, want.sample_index)
    assert got.tensor_absmax == pytest.approx(want.tensor_absmax, rel=1e-5)
    assert got.token_absmax_stale and not want.token_absmax_stale
    torch.testing.assert_close(got.sample_token_absmax(), want.sample_token_absmax(), rtol=1e-5, atol=1e-6)


def test_scale_channels_rejects_bad_scales():
    obs = LinearInputObserver("lin", 3)
    obs.observe(torch.randn(4, 3), torch.rand(4, dtype=torch.float64))
    stats = obs.finalize()
    with pytest.raises(ValueError, match="lin.*3 input channels"):
        stats.scale_channels(torch.ones(2))
    with pytest.raises(ValueError, match="nonzero"):
        stats.scale_channels(torch.tensor([1.0, 0.0, 1.0]))


# ---- data: the validation split only ---------------------------------------------------------------


def test_calibration_batches_come_from_the_validation_split_only(monkeypatch):
    read: list[str] = []
    real_read = qdata._read_text

    def spy(path):
        read.append(path.name)
        if path.name == qdata.WIKITEXT_TEST:
            raise AssertionError("calibration read the test split")
        return real_read(path)

    def forbidden(*_args):
        raise AssertionError("calibration called the test-split loader")

    monkeypatch.setattr(qdata, "_read_text", spy)
    monkeypatch.setattr(qdata, "load_wikitext_test", forbidden)
    batches = calibration_batches(ByteTokenizer(), n_samples=3, seq_len=24, seed=5)
    assert read == [qdata.WIKITEXT_VALID]
    valid = real_read(qdata.wikitext_dir() / qdata.WIKITEXT_VALID).encode("utf-8")
    assert len(batches) == 3
    for batch in batches:
        assert len(batch) == 1 and batch[0].shape == (1, 24) and batch[0].dtype == torch.long
        assert bytes(batch[0][0].tolist()) in valid
    again = calibration_batches(ByteTokenizer(), 3, 24, seed=5)  # seeded: the same windows again
    assert all(torch.equal(x[0], y[0]) for x, y in zip(batches, again, strict=True))


# ---- the pass --------------------------------------------------------------------------------------


def _analyzed(qg):
    qg = qg.copy()
    get_pass_class("analyze")()(qg)
    return qg


def test_pass_errors_clearly_without_calibration_data(two_linear):
    _, qg = two_linear
    with pytest.raises(PassError, match="calibrate: requires a structural analysis .* run analyze before it"):
        get_pass_class("calibrate")()(qg, PassContext(calibration=_batches([(1, 2)])))
    with pytest.raises(
        PassError, match=r"calibrate: no calibration data; pass calibration=\.\.\. to qcompile\.quantize"
    ):
        get_pass_class("calibrate")()(_analyzed(qg), PassContext())
    with pytest.raises(PassError, match="hesian"):
        get_pass_class("calibrate")({"hesian": True})


def test_pass_writes_state_and_report(two_linear):
    qg = _analyzed(two_linear[1])
    ctx = PassContext(calibration=_batches([(1, 5), (2, 3)]), show_progress=False)
    res = get_pass_class("calibrate")({"hessian": True, "sample_rows": 4})(qg, ctx)
    assert not res.changed
    stats = ctx.state["calibration"]
    assert set(stats) == {n.name for n in linear_nodes(qg)}
    assert all(s.xtx is not None and s.samples.shape[0] == 4 for s in stats.values())
    assert res.report["batches"] == 2 and res.report["tokens"] == 11 and res.report["linears"] == 3
    assert res.report["hessian"] is True and res.report["seconds"] > 0
    assert "3 linears" in res.summary
    # a and c share their input's stats: counted once.
    assert res.report["stats_mib"] * 2**20 == pytest.approx(
        sum(stats[n].nbytes() for n in stats if keys.get(qg.node(n))[keys.MODULE] != "c"), abs=2e-3 * 2**20
    )
