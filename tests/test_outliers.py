"""detect_outliers: planted channel outliers and massive tokens are found exactly; the report is JSON and
lists the worst layers; a real SmolLM2 run prints its worst ten."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qcompile
from qcompile.analysis.outliers import OutlierReport, find_outliers
from qcompile.ir import keys
from qcompile.pipeline.contract import PassContext, PassError, get_pass_class
from qcompile.quant.calibration import LinearInputObserver
from qcompile.tools.data import calibration_batches
from qcompile.tools.models import ByteTokenizer, tiny_llama

PLANTED = [5, 17]


def _run(qg, ctx, *names, options=None):
    """Run passes in order, each checking its required facts first (as the manager does)."""
    result = None
    for name in names:
        result = get_pass_class(name)((options or {}).get(name))(qg, ctx)
    return result


@pytest.fixture(scope="module")
def planted_llama():
    """tiny_llama with layer 0's attention-input norm γ scaled 50× on two channels: q/k/v of layer 0
    read those channels at 50× their natural size (RMSNorm applies γ after normalising)."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[PLANTED] *= 50.0
    qg = qcompile.capture(model, (torch.randint(0, 256, (1, 8)),))
    ctx = PassContext(calibration=calibration_batches(ByteTokenizer(), 2, 48), show_progress=False)
    result = _run(qg, ctx, "analyze", "calibrate", "detect_outliers")
    return qg, result


def test_planted_channels_are_exactly_the_outliers(planted_llama):
    qg, result = planted_llama
    st = qg.info["structure"]
    att0 = next(a for a in st.attentions if a.layer == 0)
    for name in (att0.q, att0.k, att0.v):
        rep = keys.get(qg.node(name))[keys.OUTLIERS]
        assert isinstance(rep, OutlierReport)
        assert sorted(c.channel for c in rep.top_channels[:2]) == PLANTED
        assert sorted(rep.outlier_channels) == PLANTED
        assert all(c.ratio > 20.0 for c in rep.top_channels[:2])
        assert rep.top_channels[2].ratio < 20.0 and len(rep.top_channels) == 8
        assert rep.max_ratio == rep.top_channels[0].ratio
    # Worst three are q/k/v of layer 0; nothing else crosses the threshold in a random model.
    assert sorted(result.report["worst"][:3]) == sorted([att0.q, att0.k, att0.v])
    assert result.report["with_channel_outliers"] == 3


def test_report_is_json_with_location_and_summary_table(planted_llama):
    qg, result = planted_llama
    report = json.loads(json.dumps(result.report))
    assert report["linears_checked"] == len(qg.info["structure"].linears) == 15
    entry = next(e for e in report["linears"] if e["node"] == report["worst"][0])
    assert entry["role"] in {"q", "k", "v"} and entry["layer"] == 0
    assert entry["module"].startswith("model.layers.0.self_attn.")
    assert {c["channel"] for c in entry["top_channels"][:2]} == set(PLANTED)
    assert entry["massive"]["count"] == 0
    lines = result.summary.splitlines()
    assert "in 3 of 15 linears" in lines[0]
    assert len(lines) == 2 + 1 + 10  # counts, title, header, ten rows
    assert "model.layers.0.self_attn" in lines[3] and "17:" in lines[3]


class SpikyInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_massive_activation_is_located_by_token_and_channel():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(1, 20, 16, generator=gen),) for _ in range(3)]
    batches[1][0][0, 3, 7] = 5000.0  # one token × channel spike, in the second batch at position 3
    qg = qcompile.capture(SpikyInput().eval(), (torch.randn(1, 4, 16),))
    ctx = PassContext(calibration=batches, show_progress=False)
    result = _run(qg, ctx, "analyze", "calibrate", "detect_outliers")
    (entry,) = result.report["linears"]
    massive = entry["massive"]
    assert massive["count"] == 1 and massive["tokens"] == [20 + 3]
    assert massive["channels"] == [7]
    assert massive["max_value"] == pytest.approx(5000.0)
    assert massive["max_ratio"] > 1000
    assert entry["outlier_channels"] == [7]  # the spike also makes channel 7's abs-max an outlier
    assert "1 tok" in result.summary


def test_thresholds_are_options_and_stale_stats_skip_massive():
    obs = LinearInputObserver("lin", 5)
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 30.0], [1.0, 2.0, 1.0, 1.0, 1.0]])  # channel medians: 1
    obs.observe(x, torch.rand(2, dtype=torch.float64))
    stats = obs.finalize()
    rep = find_outliers(stats, channel_ratio=20.0, top_k=2)
    assert rep.outlier_channels == [4] and rep.max_ratio == pytest.approx(30.0)
    assert [c.channel for c in rep.top_channels] == [4, 1]
    assert find_outliers(stats, channel_ratio=40.0).outlier_channels == []
    smoothed = stats.scale_channels(torch.tensor([1.0, 1.0, 1.0, 1.0, 30.0]))
    rep = find_outliers(smoothed)
    assert rep.outlier_channels == [] and rep.massive is None


def test_needs_calibration_first():
    qg = qcompile.capture(SpikyInput().eval(), (torch.randn(1, 4, 16),))
    with pytest.raises(
        PassError, match="detect_outliers: requires calibration statistics .* run calibrate before it"
    ):
        get_pass_class("detect_outliers")()(qg, PassContext())
    with pytest.raises(PassError, match="top_k"):
        get_pass_class("detect_outliers")({"top_k": "many"})
    with pytest.raises(PassError, match="channel_ratio .* must be > 0"):
        get_pass_class("detect_outliers")({"channel_ratio": -1})


@pytest.mark.real
def test_smollm2_outliers(smollm2, smollm2_qgraph):
    """A small budget (2 × 64 tokens of wiki.valid) is enough to see SmolLM2's outlier layers."""
    _, tok = smollm2
    qg = smollm2_qgraph[0].copy()  # the session's capture is shared: annotate a private copy
    ctx = PassContext(calibration=calibration_batches(tok, n_samples=2, seq_len=64), show_progress=False)
    result = _run(qg, ctx, "analyze", "calibrate", "detect_outliers")
    print("\n" + result.summary)
    assert result.report["linears_checked"] == 30 * 7 + 1
    assert result.report["with_channel_outliers"] > 0
    json.dumps(result.report)
    assert not any(keys.OUTLIERS in n.meta.get(keys.NAMESPACE, {}) for n in smollm2_qgraph[0].graph.nodes)
