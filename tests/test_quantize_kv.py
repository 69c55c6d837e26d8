"""The int8 KV cache on the torch side: where the analysis finds the cache entries, what calibration
records there, and what the quantize pass computes and reports for KV-cache annotations
(``annotate`` with ``kv_cache_bits = 8``).

Tolerances: the quantized entries must sit exactly on their grid (``dequantize(quantize(x))`` with the
calibrated per-channel scale, compared bit for bit); the whole tiny model's logits move by a small but
nonzero amount (int8, asserted 0 < relative error < 2e-2; measured ~3e-3).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import qcompile
from qcompile import ops
from qcompile.backends.onnx import capture_decoder
from qcompile.ir import keys
from qcompile.passes.analyze import AnalyzePass
from qcompile.passes.annotate import AnnotatePass
from qcompile.passes.quantize import QuantizePass
from qcompile.pipeline.contract import PassContext, PassError
from qcompile.quant.calibration import calibrate
from qcompile.quant.rtn import dequantize_ref, quantize_ref

NUM_LAYERS = 2  # tiny Llama: 6 heads over 2 kv heads, head_dim 8
CALIBRATION = [
    (torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(i)),) for i in range(3)
]
KV_RECIPE = {
    "recipe": {"name": "kv8", "description": "an int8 KV cache and nothing else"},
    "passes": [
        {"name": "analyze"},
        {"name": "annotate", "include_roles": [], "kv_cache_bits": 8},
        {"name": "quantize"},
    ],
}


@pytest.fixture(scope="module")
def prefill(tiny_model):
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    return qcompile.capture(tiny_model, (ids,)), ids


def _analyzed(qgraph):
    graph = qgraph.copy()
    AnalyzePass()(graph, PassContext(show_progress=False))
    return graph


def _node_values(qgraph, names: list[str], args: tuple) -> dict[str, torch.Tensor]:
    """The output of each named node when ``qgraph`` runs on ``args``."""
    seen: dict[str, torch.Tensor] = {}

    class Grab(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                seen[n.name] = out
            return out

    with torch.no_grad():
        Grab(qgraph.graph_module).run(*qgraph.flatten_inputs(args))
    return seen


@pytest.mark.parametrize("which", ["prefill", "decoder"])
def test_analysis_finds_the_cache_entries(prefill, tiny_decoder, which):
    """Keys are taken after RoPE (an add of the rotate_half form), values straight from v_proj's
    [B, KV, S, D] view; in a decode step they are the ``new`` of the cache concat."""
    graph = _analyzed(prefill[0] if which == "prefill" else tiny_decoder)
    attentions = graph.info["structure"].attentions
    assert len(attentions) == NUM_LAYERS
    for site in attentions:
        key, value = graph.node(site.key_source), graph.node(site.value_source)
        assert key.target is torch.ops.aten.add.Tensor  # q·cos + rotate_half(q)·sin
        assert value.target is torch.ops.aten.transpose.int
        for node in (key, value):
            shape = node.meta["val"].shape
            assert len(shape) == 4 and shape[1] == 2 and shape[3] == 8
        if which == "decoder":
            assert all(u.target is torch.ops.aten.cat.default for u in key.users)


def test_calibration_records_the_cache_entries_per_channel(prefill):
    graph = _analyzed(prefill[0])
    sites = graph.info["structure"].attentions
    names = [n for s in sites for n in (s.key_source, s.value_source)]
    stats = calibrate(graph, CALIBRATION, progress=False, cache_entries=names)
    assert set(stats) == set(graph.info["structure"].linears)  # the cache entries are not linears
    want = {name: torch.zeros(16) for name in names}
    for batch in CALIBRATION:
        values = _node_values(graph, names, batch)
        for name in names:
            per_channel = values[name].abs().amax(dim=(0, 2)).flatten()  # [KV, D] -> channel h·D + d
            want[name] = torch.maximum(want[name], per_channel)
    for name in names:
        kv = keys.get(graph.node(name))[keys.KV_STATS]
        assert kv.n_tokens == 3 * 24 and kv.samples.shape == (72, 16)
        torch.testing.assert_close(kv.channel_absmax, want[name], rtol=0, atol=0)


def test_kv_annotations_put_every_cache_entry_on_its_int8_grid(prefill):
    qgraph, ids = prefill
    qm = qcompile.quantize(qgraph, KV_RECIPE, calibration=CALIBRATION, progress=False)
    graph = qm.qgraph
    sites = graph.info["structure"].attentions
    pairs = []
    for site in sites:
        for name in (site.key_source, site.value_source):
            (dq,) = [u for u in graph.node(name).users if u.target is ops.QUANTIZE][0].users
            assert dq.target is ops.DEQUANTIZE and keys.get(dq)[keys.QUANT] == "kv8c"
            # every reader of the float entry now reads the dequantized one
            assert set(graph.node(name).users) == {dq.args[0]}
            pairs.append((name, dq))
    values = _node_values(graph, [n for p in pairs for n in (p[0], p[1].name)], (ids,))
    for name, dq in pairs:
        stats = keys.get(graph.node(name))[keys.KV_STATS]
        scale = (stats.channel_absmax / 127.5).view(1, 2, 1, 8)
        zero = torch.zeros_like(scale, dtype=torch.int8)
        want = dequantize_ref(quantize_ref(values[name], scale, zero, -128, 127, 0), scale, zero, 0)
        assert torch.equal(values[dq.name], want)
    with torch.no_grad():
        ref, got = qgraph(ids).logits, graph(ids).logits
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 2e-2, rel
    report = qm.report("quantize")
    assert report["quantized"] == 0 and report["kv_cache"] is not None
    entries = report["kv_cache"]["entries"]
    assert sorted((r["layer"], r["entry"]) for r in entries) == [
        (layer, e) for layer in range(NUM_LAYERS) for e in ("key", "value")
    ]
    for row in entries:
        assert row["scheme"] == "kv8c" and row["sqnr_db"] > 35  # int8: ~6 dB a bit
    assert f"kv8c static per channel on {2 * NUM_LAYERS} entries" in qm.summary()


def test_kv_annotations_without_calibration_refuse_and_change_nothing(prefill):
    graph = _analyzed(prefill[0])
    ctx = PassContext(show_progress=False)
    AnnotatePass({"include_roles": [], "kv_cache_bits": 8})(graph, ctx)
    before = graph.print_readable()
    with pytest.raises(
        PassError, match="quantize at node `.*`: key cache entry annotated kv8c static: .* calibration="
    ) as exc:
        QuantizePass()(graph, ctx)
    assert exc.value.node == graph.info["structure"].attentions[0].key_source
    assert graph.print_readable() == before


def test_ranges_are_those_of_the_graph_the_pass_sees(prefill):
    """SmoothQuant+'s v → o smoothing divides the value channels before quantize runs: the scales
    must come from the smoothed values, so on the calibration data every channel reaches the end of
    its int8 grid (with ranges observed before smoothing, a channel divided by s would use ~127/s)."""
    recipe = {
        "recipe": {"name": "smooth-kv8", "description": "SmoothQuant+ (v → o included), int8 cache"},
        "passes": [
            {"name": "analyze"},
            {"name": "annotate", "weight_bits": 4, "group_size": 16, "act_mode": "none", "kv_cache_bits": 8},
            {"name": "calibrate"},
            {"name": "smooth", "search": True},
            {"name": "quantize"},
        ],
    }
    qm = qcompile.quantize(prefill[0], recipe, calibration=CALIBRATION, progress=False)
    vo = [g for g in qm.report("smooth")["groups"] if g["kind"] == "vo" and g["alpha"] is not None]
    assert vo, "the test needs a smoothed v → o group"
    graph = qm.qgraph
    quantizers = [
        u.name
        for site in graph.info["structure"].attentions
        for u in graph.node(site.value_source).users
        if u.target is ops.QUANTIZE
    ]
    reach = {name: torch.zeros(16) for name in quantizers}
    for batch in CALIBRATION:
        for name, q in _node_values(graph, quantizers, batch).items():
            reach[name] = torch.maximum(reach[name], q.float().abs().amax(dim=(0, 2)).flatten())
    for name, top in reach.items():
        assert bool((top >= 127).all()), (name, top)


def test_only_an_8_bit_cache_is_offered():
    with pytest.raises(PassError, match="annotate: .*a 4-bit KV cache is not supported; only an 8-bit cache"):
        AnnotatePass({"kv_cache_bits": 4})


def test_the_decode_step_is_quantized_the_same_way(tiny_model):
    """On the decode-step capture the quantizer sits before the cache concat: a prefill over the
    calibration text and the prefill capture's quantized logits agree (same scales: same data)."""
    decoder = capture_decoder(tiny_model)
    layout = decoder.info["decoder"]
    qd = qcompile.quantize(
        decoder,
        KV_RECIPE,
        calibration=[(ids, layout.empty(1)) for (ids,) in CALIBRATION],
        example_inputs=(CALIBRATION[0][0], layout.empty(1)),
        progress=False,
    )
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    qp = qcompile.quantize(
        qcompile.capture(tiny_model, (ids,)), KV_RECIPE, calibration=CALIBRATION, progress=False
    )
    with torch.no_grad():
        step_logits, present = qd.qgraph(ids, layout.empty(1))
        full = qp.qgraph(ids).logits
    torch.testing.assert_close(step_logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    # the cache holds grid values: present / scale is integral
    site = qd.qgraph.info["structure"].attentions[0]
    stats = keys.get(qd.qgraph.node(site.key_source))[keys.KV_STATS]
    k = present[0] / (stats.channel_absmax / 127.5).view(1, 2, 1, 8)
    assert torch.allclose(k, k.round(), atol=1e-3)
