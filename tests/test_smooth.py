"""The smooth pass: SmoothQuant / SmoothQuant+ through the equivalence engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile
from qcompile.pipeline.instruments import EquivalenceCheck
from qcompile.tools.models import tiny_bert, tiny_llama

# fp32 graphs, merges in float64: smoothing moves outputs by rounding only.
EQUIV_RTOL = 1e-5


class PlantedOutliers(nn.Module):
    """RMSNorm with two channels 80× the rest, read by two linears: SmoothQuant's textbook case."""

    def __init__(self, d: int = 64, out: int = 96) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gain = nn.Parameter(torch.ones(d))
        self.lin1 = nn.Linear(d, out, bias=False)
        self.lin2 = nn.Linear(d, out, bias=False)
        with torch.no_grad():
            self.lin1.weight.copy_(torch.randn(out, d, generator=g) / d**0.5)
            self.lin2.weight.copy_(torch.randn(out, d, generator=g) / d**0.5)
            self.gain[[3, 40]] = 80.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.gain
        return self.lin1(h) + self.lin2(h)


def _recipe(smooth: dict | None, act_mode: str, weight_bits: int = 8, group_size: int = 0) -> dict:
    annotate = {
        "name": "annotate",
        "weight_bits": weight_bits,
        "group_size": group_size,
        "act_bits": 8,
        "act_mode": act_mode,
    }
    passes = [{"name": "analyze"}, annotate, {"name": "calibrate"}]
    if smooth is not None:
        passes.append({"name": "smooth", **smooth})
    passes.append({"name": "quantize"})
    return {"recipe": {"name": "test"}, "passes": passes}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize(("act_mode", "min_gain"), [("dynamic_per_token", 6.0), ("static_per_tensor", 3.0)])
def test_planted_outliers_smoothing_cuts_w8a8_error(act_mode, min_gain):
    """Measured: 8.1× (dynamic per token) and 3.8× (static per tensor) lower output MSE with α = 0.5."""
    model = PlantedOutliers().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 16, 64, generator=g),) for _ in range(4)]
    x = torch.randn(2, 16, 64, generator=g)
    ref = model(x)
    errs = {}
    for name, smooth in (("rtn", None), ("smooth", {"alpha": 0.5})):
        qm = qcompile.quantize(model, _recipe(smooth, act_mode), calibration=batches, progress=False)
        errs[name] = (_first(qm(x)) - ref).pow(2).mean().item()
    assert errs["rtn"] / errs["smooth"] > min_gain, errs


def _run_smooth(model, batches, annotate: dict | None = None, **smooth_opts):
    """analyze → (annotate) → calibrate → smooth, checked for equivalence."""
    annotated = [{"name": "annotate", **annotate}] if annotate is not None else []
    recipe = {
        "recipe": {"name": "t"},
        "passes": ["analyze", *annotated, "calibrate", {"name": "smooth", **smooth_opts}],
    }
    check = EquivalenceCheck(default_tolerance=EQUIV_RTOL)
    qm = qcompile.quantize(model, recipe, calibration=batches, instruments=[check], progress=False)
    return qm, qm.report("smooth")


def test_tiny_llama_smoothing_is_equivalent_and_changes_weights():
    model = tiny_llama()
    batches = [(torch.randint(0, 256, (1, 24)),) for _ in range(3)]
    qm, report = _run_smooth(model, batches)
    assert report["equivalence_check"]["passed"]
    assert report["equivalence_check"]["max_error"] < EQUIV_RTOL
    kinds = sorted({g["kind"] for g in report["groups"]})
    assert kinds == ["down", "gate_up", "qkv", "vo"]
    assert report["groups_smoothed"] == 4 * model.config.num_hidden_layers
    assert report["refused"] == []
    # The numbers really moved: the first layer's input-norm γ is no longer the model's.
    st = qm.qgraph.info["structure"]
    gamma = qm.qgraph.get_constant(st.norms[st.attentions[0].input_norm].weight)
    assert not torch.allclose(gamma, model.model.layers[0].input_layernorm.weight)
    x = torch.randint(0, 256, (2, 17))
    ref = model(x).logits
    assert (qm(x).logits - ref).abs().max() / ref.abs().max() < EQUIV_RTOL


def test_tiny_bert_post_norm_groups_are_refused_with_reasons():
    """BERT's LayerNorm outputs also feed the residual add: a diagonal cannot be folded into γ there."""
    model = tiny_bert()
    batches = [(torch.randint(0, 256, (2, 12)),) for _ in range(2)]
    qm, report = _run_smooth(model, batches)
    assert report["equivalence_check"]["passed"]
    refused = [r for r in report["refused"] if r["kind"] in ("qkv", "gate_up", "norm")]
    assert refused, report
    assert all("smooth" in r["reason"] for r in refused)
    assert any(s["kind"] == "down" and "gelu" in s["reason"] for s in report["skipped"])
    # v → o per head is legal in BERT (multi-head, no GQA): those groups are smoothed.
    assert {g["kind"] for g in report["groups"]} == {"vo"}
    x = torch.randint(0, 256, (2, 9))
    ref = model(x).last_hidden_state
    assert (qm(x).last_hidden_state - ref).abs().max() / ref.abs().max() < EQUIV_RTOL


def test_search_never_worse_than_leaving_a_group_alone():
    model = tiny_llama()
    batches = [(torch.randint(0, 256, (1, 32)),) for _ in range(3)]
    recipe = _recipe({"search": True}, act_mode="none", weight_bits=4, group_size=32)
    qm = qcompile.quantize(model, recipe, calibration=batches, progress=False)
    report = qm.report("smooth")
    assert report["objective"] == {"weight": "w4g32s", "activation": "a16"}
    for g in report["groups"]:
        assert g["error_after"] <= g["error_before"]
        assert set(g["errors"]) == {"none"} | {f"{0.05 * i:g}" for i in range(21)}


def test_qqq_scales_clip_only_channels_above_the_threshold():
    from qcompile.quant.smoothing import qqq_scales

    act = torch.tensor([0.5, 2.0, 8.0, 100.0], dtype=torch.float64)
    s = qqq_scales(act, 4.0)
    assert s.tolist() == [1.0, 1.0, 2.0, 25.0]
    # after smoothing no channel's range exceeds t, and channels under t are untouched
    assert torch.all(act / s <= 4.0)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        qqq_scales(act, 0.0)


def test_qqq_rule_is_equivalent_and_never_worse_than_identity():
    """QQQ's threshold search on tiny Llama: float outputs unchanged (equivalence check), every group's
    W4A8 objective ≤ leaving it alone, the grid's ratios reported, and the planted-outlier input gets
    scales > 1 only on channels above the chosen threshold."""
    model = tiny_llama()
    batches = [(torch.randint(0, 256, (1, 32)),) for _ in range(3)]
    qm, report = _run_smooth(
        model,
        batches,
        annotate={"weight_bits": 4, "group_size": 32, "act_bits": 8, "act_mode": "dynamic_per_token"},
        rule="qqq",
        search=True,
    )
    assert report["equivalence_check"]["passed"], report["equivalence_check"]
    assert report["mode"].startswith("threshold search (QQQ")
    assert report["parameter"] == "t / max|X|"
    assert report["objective"] == {"weight": "w4g32s", "activation": "a8ts"}
    from qcompile.passes.smooth import DEFAULT_THRESHOLD_GRID

    for g in report["groups"]:
        assert g["error_after"] <= g["error_before"]
        assert set(g["errors"]) == {"none"} | {f"{r:g}" for r in DEFAULT_THRESHOLD_GRID}
        if g["alpha"] is not None:
            assert g["s_min"] == pytest.approx(1.0)  # QQQ never scales a channel up
    assert report["groups_smoothed"] > 0


def test_qqq_rule_needs_search():
    from qcompile.pipeline.contract import PassError

    model = tiny_llama()
    batches = [(torch.randint(0, 256, (1, 8)),)]
    with pytest.raises(PassError, match="rule = 'qqq' searches its threshold"):
        _run_smooth(model, batches, rule="qqq")


def test_search_scores_each_sink_under_its_own_annotation():
    """down_proj annotated at 8 bits, the rest at 4: the down groups are searched under w8, the others
    under w4 — and the pass's own options override the annotations for the search only."""
    model = tiny_llama()
    batches = [(torch.randint(0, 256, (1, 32)),) for _ in range(2)]
    mixed = {
        "weight_bits": 4,
        "group_size": 32,
        "act_mode": "none",
        "overrides": [{"roles": ["down"], "weight_bits": 8}],
    }
    _, report = _run_smooth(model, batches, annotate=mixed, search=True)
    layers = model.config.num_hidden_layers
    assert report["objective"] == {"schemes": {"w4g32s-a16": 6 * layers, "w8g32s-a16": layers}}
    down = [g for g in report["groups"] if g["kind"] == "down"]
    _, only_down = _run_smooth(model, batches, annotate=mixed, search=True, groups=["down"], weight_bits=4)
    assert only_down["objective"] == {"weight": "w4g32s", "activation": "a16"}
    # the same groups scored under w4 instead of w8: the quantized error of doing nothing grows
    assert all(
        g4["error_before"] > g8["error_before"] for g4, g8 in zip(only_down["groups"], down, strict=True)
    )


def test_search_without_annotations_is_refused_when_the_recipe_loads():
    from qcompile.pipeline.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="'smooth' requires quantization specs annotated .* run annotate"):
        load_recipe({"passes": ["analyze", "calibrate", {"name": "smooth", "search": True}]})
    load_recipe({"passes": ["analyze", "calibrate", {"name": "smooth", "alpha": 0.5}]})  # fixed α: no need


def test_smooth_without_calibration_names_the_way_out():
    from qcompile.analysis.analyzer import analyze
    from qcompile.passes.smooth import SmoothPass
    from qcompile.pipeline.contract import PassContext, PassError

    qg = qcompile.capture(tiny_llama(), (torch.randint(0, 256, (2, 8)),))
    analyze(qg)
    # The recipe validator already refuses smooth before calibrate; called directly, the pass still
    # refuses to run on missing statistics rather than smoothing with made-up ones.
    ctx = PassContext()
    with pytest.raises(PassError, match="smooth: requires calibration statistics .* run calibrate before it"):
        SmoothPass()(qg, ctx)


def test_unknown_group_kind_is_an_error():
    from qcompile.pipeline.contract import PassError
    from qcompile.pipeline.manager import run_recipe

    qg = qcompile.capture(tiny_llama(), (torch.randint(0, 256, (2, 8)),))
    batches = [(torch.randint(0, 256, (1, 8)),)]
    from qcompile.pipeline.contract import PassContext

    with pytest.raises(PassError, match="unknown group kind"):
        run_recipe(
            qg,
            {
                "recipe": {"name": "t"},
                "passes": ["analyze", "calibrate", {"name": "smooth", "groups": ["qkv", "xyz"]}],
            },
            PassContext(calibration=batches, show_progress=False),
        )


@pytest.mark.real
def test_smollm2_smoothing_keeps_logits(smollm2, smollm2_qgraph):
    model, tok = smollm2
    qg, ids = smollm2_qgraph
    from qcompile.tools.data import calibration_windows

    batches = [(w,) for w in calibration_windows(tok, 2, 64, seed=0)]
    qm, report = _run_smooth(qg, batches)
    assert report["groups_smoothed"] == 4 * 30 and report["refused"] == []
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    out = qm(ids).logits
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
