"""fold_qdq: int4 packing, redundant requantize removal, qlinear ops — and folding changes no numbers."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile import ops
from qcompile.ir import QGraph, keys
from qcompile.ops import QEMBEDDING, QLINEAR_W, QLINEAR_WA
from qcompile.passes.analyze import AnalyzePass
from qcompile.passes.annotate import AnnotatePass
from qcompile.passes.calibrate import CalibratePass
from qcompile.passes.fold_qdq import FoldQDQPass, remove_redundant_requantize
from qcompile.passes.quantize import QuantizePass
from qcompile.pipeline.contract import PassContext, get_pass_class
from qcompile.pipeline.recipe import load_recipe
from qcompile.quant.packing import (
    pack_int4_weight,
    pack_int4_zero_point,
    unpack_int4_weight,
    unpack_int4_zero_point,
)
from qcompile.tools.models import tiny_llama

SCHEMES = {
    "w4a16": {"weight_bits": 4, "group_size": 16, "act_mode": "none"},
    "w4a16-asym": {"weight_bits": 4, "group_size": 32, "weight_symmetric": False, "act_mode": "none"},
    "w8a8": {},
    "w4a8": {"weight_bits": 4, "group_size": 32},
    "w4a4": {"weight_bits": 4, "group_size": 32, "act_bits": 4},
    "w8a8-asym-act": {"act_symmetric": False},
    "w4a16-per-channel": {"weight_bits": 4, "group_size": 0, "act_mode": "none"},  # not packable
    "w8a16-g16": {"weight_bits": 8, "group_size": 16, "act_mode": "none"},  # blocked uint8
}


@pytest.fixture(scope="module")
def tiny():
    """Tiny Llama captured and analysed once: (qgraph, ids). Tests quantize copies."""
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    qg = qcompile.capture(tiny_llama(), (ids,))
    AnalyzePass()(qg, PassContext())
    return qg, ids


def _quantized(tiny, options: dict, calibrate: bool = False) -> QGraph:
    qg, ids = tiny
    qg = qg.copy()
    ctx = PassContext(calibration=[(ids,)], show_progress=False)
    if calibrate:
        CalibratePass({"sample_rows": 32})(qg, ctx)
    AnnotatePass(options)(qg, ctx)
    QuantizePass()(qg, ctx)
    return qg


def _quantized_with_head(tiny, scheme: dict, **head) -> tuple[QGraph, dict]:
    """``scheme`` on the linears plus lm_head / embedding annotations (``Recipe.with_quantization``)."""
    passes = ["analyze", {"name": "annotate", **scheme}, "quantize"]
    recipe = load_recipe({"recipe": {"name": "t"}, "passes": passes}).with_quantization(**head)
    qm = qcompile.quantize(tiny[0], recipe, example_inputs=(tiny[1],), progress=False)
    return qm.qgraph, qm.report("quantize")


def _fold(qg: QGraph):
    folded = qg.copy()
    result = FoldQDQPass()(folded, PassContext())
    return folded, result


# ---- packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "g"), [(576, 128), (48, 32), (40, 16), (100, 64)])
def test_int4_pack_roundtrip_and_layout(n, g):
    q = torch.randint(-8, 8, (5, n), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    packed = pack_int4_weight(q, g)
    groups = -(-n // g)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (5, groups, g // 2)
    assert torch.equal(unpack_int4_weight(packed, n), q)
    # low nibble first, offset binary: byte 0 of row 0 holds elements 0 (bits 0-3) and 1 (bits 4-7)
    b = int(packed[0, 0, 0])
    assert b & 0xF == int(q[0, 0]) + 8 and b >> 4 == int(q[0, 1]) + 8
    # the ragged tail is padded with the zero code (q = 0 → 8)
    if n % g:
        tail = packed.reshape(5, -1)[:, n // 2 :]
        assert torch.all(tail == 0x88)


def test_int4_zero_point_pack_roundtrip():
    zp = torch.randint(-8, 8, (7, 5), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4_zero_point(zp)
    assert tuple(packed.shape) == (7, 3)
    assert torch.equal(unpack_int4_zero_point(packed, 5), zp)


def test_int4_packing_refuses_bad_input():
    with pytest.raises(ValueError, match="power of two"):
        pack_int4_weight(torch.zeros(2, 48, dtype=torch.int8), 24)
    with pytest.raises(ValueError, match="int4 range"):
        pack_int4_weight(torch.full((2, 32), 9, dtype=torch.int8), 16)


# ---- the pass ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_folding_changes_no_numbers(tiny, scheme):
    """Folded graph == unfolded quantized graph, bit for bit, at a new batch/sequence shape."""
    qg = _quantized(tiny, SCHEMES[scheme])
    folded, result = _fold(qg)
    ids = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(5))
    assert torch.equal(folded(ids).logits, qg(ids).logits)
    st = qg.info["structure"]
    assert result.report["folded"] == len(st.linears) - 1  # all but lm_head
    assert not any(
        n.target is torch.ops.aten.linear.default and n.args[1].op != "get_attr" for n in folded.graph.nodes
    )


def test_static_activations_fold_exactly(tiny):
    qg = _quantized(tiny, {"act_mode": "static_per_tensor"}, calibrate=True)
    folded, result = _fold(qg)
    ids = tiny[1]
    assert torch.equal(folded(ids).logits, qg(ids).logits)
    wa = [n for n in folded.graph.nodes if n.target is QLINEAR_WA]
    assert wa and all(n.args[1].op == "get_attr" and n.args[2] is None for n in wa)  # constant scale, zp 0


def test_ops_storage_and_annotations(tiny):
    w4, _ = _fold(_quantized(tiny, SCHEMES["w4a16"]))
    w8a8, r8 = _fold(_quantized(tiny, SCHEMES["w8a8"]))
    w4_nodes = [n for n in w4.graph.nodes if n.target is QLINEAR_W]
    assert len(w4_nodes) == 14
    for n in w4_nodes:
        packed = w4.get_constant(n.args[1])
        assert packed.dtype == torch.uint8 and n.args[3] is None  # symmetric: no zero point
        bits, in_features, group = n.args[5:]
        assert (bits, group) == (4, 16) and tuple(packed.shape[1:]) == (-(-in_features // 16), 8)
        assert keys.get(n)[keys.QUANT] == "w4g16s-a16" and "val" in n.meta
    wa = [n for n in w8a8.graph.nodes if n.target is QLINEAR_WA]
    assert len(wa) == 14 and all(w8a8.get_constant(n.args[3]).dtype == torch.int8 for n in wa)
    # the activation dequantize is gone; the shared quantize feeds q, k and v directly
    assert not any(n.target is ops.DEQUANTIZE for n in w8a8.graph.nodes)
    assert all(n.args[0].target is ops.QUANTIZE and n.args[2] is None for n in wa)
    # no int8 q tensor of the unfolded graph stays behind
    assert not any(name.endswith("_weight_q") for name, _ in w4.graph_module.named_buffers())
    assert r8.report["weight_bytes_after"] <= r8.report["weight_bytes_before"]


def test_int4_storage_halves_the_weight_bytes(tiny):
    _, result = _fold(_quantized(tiny, SCHEMES["w4a8"]))
    rows = result.report["linears"]
    assert {r["storage"] for r in rows} == {"int4 packed"}
    # down_proj: 48 × 128 int4 = 3072 bytes (+ fp32 scales), vs 6144 int8 bytes before
    down = next(r for r in rows if r["role"] == "down")
    assert down["weight_bytes_after"] == 48 * 64 + 48 * 4 * 4
    assert "14 linears folded" in result.summary


def test_unpackable_int4_keeps_int8_container(tiny):
    qg = _quantized(tiny, SCHEMES["w4a16-per-channel"])
    folded, result = _fold(qg)
    assert {r["storage"] for r in result.report["linears"]} == {"int4 in int8 (per channel)"}
    assert all(n.args[5] == 8 for n in folded.graph.nodes if n.target is QLINEAR_W)


def test_redundant_requantize_pair_is_removed():
    """quantize(dequantize(quantize(x, s, z)), s, z) → the first quantize; a wider grid is kept."""

    class M(torch.nn.Module):
        def forward(self, x, s, z):
            q = ops.quantize(x, s, z, -8, 7, 0)
            d = ops.dequantize(q, s, z, 0)
            again = ops.quantize(d, s, z, -128, 127, 0)  # the int4 values fit the int8 grid: redundant
            narrower = ops.quantize(d, s, z, -4, 3, 0)  # clamps: not redundant
            return ops.dequantize(again, s, z, 0) + ops.dequantize(narrower, s, z, 0)

    x, s, z = torch.randn(4, 8) * 3, torch.tensor(0.4), torch.tensor(0, dtype=torch.int8)
    qg = qcompile.capture(M(), (x, s, z), dynamic=False)
    before = qg(x, s, z)
    assert remove_redundant_requantize(qg) == 1
    qg.recompile()
    assert sum(n.target is ops.QUANTIZE for n in qg.graph.nodes) == 2
    assert torch.equal(qg(x, s, z), before)


def test_registered_and_a_float_graph_is_left_alone(tiny):
    assert get_pass_class("fold_qdq") is FoldQDQPass
    float_graph = tiny[0].copy()
    result = FoldQDQPass()(float_graph, PassContext())
    assert not result.changed and result.report["folded"] == 0


def test_folded_graph_reexports(tiny):
    folded, _ = _fold(_quantized(tiny, SCHEMES["w4a8"]))
    ids = tiny[1]
    ep = torch.export.export(folded.graph_module, (ids,), strict=False)
    assert QLINEAR_WA in {n.target for n in ep.graph.nodes}
    torch.testing.assert_close(ep.module()(ids)[0], folded.run_flat([ids])[0], rtol=0, atol=0)


def test_tied_head_and_embedding_share_one_packed_table(tiny):
    qg, report = _quantized_with_head(
        tiny, SCHEMES["w4a16"], lm_head_bits=4, embedding_bits=4, head_group_size=16
    )
    assert report["embedding"][0]["shared_with_lm_head"]
    folded, result = _fold(qg)
    ids = tiny[1]
    assert torch.equal(folded(ids).logits, qg(ids).logits)
    emb = next(n for n in folded.graph.nodes if n.target is QEMBEDDING)
    head = next(
        n for n in folded.graph.nodes if n.target is QLINEAR_W and keys.get(n)[keys.ROLE] == "lm_head"
    )
    assert emb.args[1] is head.args[1] and emb.args[4:] == (4, 48, 16)
    assert not any(t.dtype == torch.float32 and t.shape == (256, 48) for t in folded.graph_module.buffers())
    pair = [
        r["weight_bytes_after"] for r in result.report["linears"] if r["role"] in ("embedding", "lm_head")
    ]
    assert sorted(pair) == [0, 256 * 3 * 8 + 256 * 3 * 4]  # the packed table and scales counted once


def test_int8_embedding_alone_folds_exactly(tiny):
    qg, report = _quantized_with_head(tiny, SCHEMES["w4a16"], embedding_bits=8, head_group_size=0)
    assert not report["embedding"][0]["shared_with_lm_head"]
    folded, _ = _fold(qg)
    ids = tiny[1]
    assert torch.equal(folded(ids).logits, qg(ids).logits)
    emb = next(n for n in folded.graph.nodes if n.target is QEMBEDDING)
    assert folded.get_constant(emb.args[1]).dtype == torch.int8 and emb.args[4] == 8


def test_tied_int8_head_is_blocked_and_shared(tiny):
    qg, _ = _quantized_with_head(tiny, SCHEMES["w4a16"], lm_head_bits=8, embedding_bits=8, head_group_size=16)
    folded, result = _fold(qg)
    assert torch.equal(folded(tiny[1]).logits, qg(tiny[1]).logits)
    emb = next(n for n in folded.graph.nodes if n.target is QEMBEDDING)
    table = folded.get_constant(emb.args[1])
    assert table.dtype == torch.uint8 and tuple(table.shape) == (256, 3, 16) and emb.args[4] == 8
    assert {r["storage"] for r in result.report["linears"] if r["role"] in ("lm_head", "embedding")} == {
        "int8 blocked"
    }
