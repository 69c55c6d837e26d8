"""SmoothRot: smooth the down_proj input with α searched after the R4 Hadamard, then QuaRot."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.analysis.analyzer import analyze
from qcompile.ops import QUANT_OPS
from qcompile.ops.hadamard import HADAMARD
from qcompile.pipeline.instruments import EquivalenceCheck
from qcompile.quant.calibration import calibrate
from qcompile.quant.hadamard import online_plan, plan_matrix
from qcompile.quant.rtn import fake_quant_activation, quantize_weight
from qcompile.quant.scheme import ActQuantSpec, WeightQuantSpec
from qcompile.quant.smoothing import SearchObjective, SinkQuantizers, find_groups
from qcompile.tools.models import tiny_llama

W4 = WeightQuantSpec(4, True, 32)
A4 = ActQuantSpec(4, "dynamic_per_token", True)
ANNOTATE = {"name": "annotate", "weight_bits": 4, "group_size": 32, "act_bits": 4}
SMOOTH_DOWN = {
    "name": "smooth",
    "groups": ["down"],
    "search": True,
    "alpha_grid": [0.1 * i for i in range(11)],
}


@pytest.fixture(scope="module")
def planted():
    """tiny_llama whose down_proj inputs have two channels 30× the rest (up rows scaled), captured."""
    model = tiny_llama(tie_word_embeddings=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[[5, 77]] *= 30.0
    return model, qcompile.capture(model, (torch.randint(0, 256, (2, 32)),))


def _manual_error(x, w, s, h):
    xs, ws = x / s, w * s
    if h is not None:
        xs, ws = xs @ h, ws @ h
    xq = fake_quant_activation(xs.float(), A4).double()
    wq = quantize_weight(ws.float(), W4).dequantize().double()
    return float(((x @ w.T - xq @ wq.T) ** 2).sum())


def test_hadamard_objective_scores_after_the_r4_hadamard_and_the_default_is_unchanged(planted):
    qg = planted[1].copy()
    st = analyze(qg)
    stats = calibrate(qg, [(torch.randint(0, 256, (2, 24)),)], progress=False)
    group = find_groups(st, ["down"])[0][0]
    sink = group.sinks[0]
    x = stats[sink].samples.double()
    w = qg.get_constant(st.linears[sink].weight).double()
    s = torch.linspace(0.5, 3.0, 128, dtype=torch.float64)
    h = plan_matrix(online_plan(128))
    plain = SearchObjective({sink: SinkQuantizers(W4, A4)})
    rotated = SearchObjective({sink: SinkQuantizers(W4, A4)}, rotation="hadamard")
    assert plain.error(qg, st, group, stats, s) == _manual_error(x, w, s, None)
    assert rotated.error(qg, st, group, stats, s) == _manual_error(x, w, s, h)
    assert rotated.error(qg, st, group, stats, s) != plain.error(qg, st, group, stats, s)


def _behind_activation_qdq(node):
    """The tensor an activation quantize → dequantize chain reads (the node itself if there is none)."""
    while node.target in QUANT_OPS:
        node = node.args[0]
    return node


def _recipe(passes: list) -> dict:
    return {"recipe": {"name": "t"}, "passes": passes}


def test_smoothrot_is_equivalent_before_quantization_and_never_worse_than_quarot_at_down(planted):
    """The α search scores exactly what the quantizer later sees at down_proj (H (x ⊘ s), RTN weights,
    the same calibration rows), so every down_proj's output SQNR is at least QuaRot's."""
    qg = planted[1]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (2, 32), generator=g),) for _ in range(2)]
    rotated = ["fuse_norms", "rotate", "calibrate", "quantize"]
    smoothrot = [
        "analyze",
        ANNOTATE,
        "calibrate",
        {**SMOOTH_DOWN, "objective_rotation": "hadamard"},
        *rotated,
    ]
    check = EquivalenceCheck(default_tolerance=1e-5)
    qm_sr = qcompile.quantize(
        qg, _recipe(smoothrot), calibration=batches, instruments=[check], progress=False
    )
    assert [r.pass_name for r in check.records] == ["smooth", "fuse_norms", "rotate"]
    assert all(r.passed for r in check.records), check.table()
    smooth = qm_sr.report("smooth")
    assert smooth["mode"].endswith("(SmoothRot)") and smooth["objective"]["rotation"] == "hadamard"
    assert {g["kind"] for g in smooth["groups"]} == {"down"} and smooth["groups_smoothed"] >= 1
    assert all(g["error_after"] <= g["error_before"] for g in smooth["groups"])
    # Net effect on the down_proj input: H (x ⊘ s) — the online Hadamard sits right before it.
    st = qm_sr.qgraph.info["structure"]
    assert all(_behind_activation_qdq(qm_sr.qgraph.node(m.down).args[0]).target is HADAMARD for m in st.mlps)

    qm_qr = qcompile.quantize(
        qg, _recipe(["analyze", ANNOTATE, *rotated]), calibration=batches, progress=False
    )

    def down_sqnr(qm):
        return {
            r["node"]: r["output_sqnr_db"] for r in qm.report("quantize")["linears"] if r["role"] == "down"
        }

    ours, theirs = down_sqnr(qm_sr), down_sqnr(qm_qr)
    assert all(ours[n] >= theirs[n] - 0.05 for n in ours), (ours, theirs)
