"""Fused decode-step attention (:mod:`qcompile.backends.onnx.attention`): the lowering in torch, the
``GroupQueryAttention`` translation in ONNX Runtime, and the layout of the written file.

Tolerances (measured on tiny Llama, fp32, CPU EP, one thread):
- lowering in torch: bit for bit (max abs diff 0) — the op's reference runs the ops it replaces;
  asserted at 1e-5.
- ORT, fused file vs the reference QGraph through prefill, 3 decode steps and a multi-token
  continuation: ≤ 2.4e-7 max abs on logits of magnitude ~0.8 (fp and W4A16 at accuracy level 1);
  asserted at 1e-4 × the logits' max abs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.analysis.patterns import SDPA_OPS
from qcompile.backends.onnx import ExportOptions, OrtDecoder, SessionOptions, make_session
from qcompile.errors import PassError
from qcompile.ops import GQA_ATTENTION
from qcompile.passes.fuse_attention import FuseAttentionPass, fuse_attention
from qcompile.pipeline.instruments import DisablePasses
from qcompile.tools.export import export_decoder

NUM_LAYERS = 2  # tiny Llama: 2 layers, 6 heads over 2 kv heads, head_dim 8


@pytest.fixture(scope="module")
def lowered(tiny_decoder):
    graph = tiny_decoder.copy()
    return graph, fuse_attention(graph)


def _random_step(layout, batch: int, seq: int, past: int, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, seq), generator=gen)
    shape = (batch, layout.num_kv_heads, past, layout.head_dim)
    return ids, tuple(torch.randn(shape, generator=gen) for _ in range(2 * layout.num_layers))


def _targets(graph) -> list:
    return [n.target for n in graph.graph.nodes if n.op == "call_function"]


def test_lowering_fuses_every_layer_and_removes_the_decomposition(lowered, tiny_decoder):
    graph, report = lowered
    assert [r.fused for r in report.rows] == [True] * NUM_LAYERS and not report.unfused
    assert report.fused[0].heads == 6 and report.fused[0].kv_heads == 2
    targets = _targets(graph)
    aten = torch.ops.aten
    assert targets.count(GQA_ATTENTION) == NUM_LAYERS
    assert not any(t in SDPA_OPS for t in targets)
    # the transpose(1, 2) + view after attention went into the op: it returns [B, S, H·D]
    for node in (n for n in graph.graph.nodes if n.target is GQA_ATTENTION):
        assert node.args[-1] is True and len(node.meta["val"][0].shape) == 3
    transposes = _targets(tiny_decoder).count(aten.transpose.int)
    assert targets.count(aten.transpose.int) == transposes - NUM_LAYERS
    # dead mask construction, repeat_kv copies and cache concats are gone; RoPE keeps its own cats
    # and its arange of positions
    before = _targets(tiny_decoder)
    for gone in (aten.le.Tensor, aten.expand.default, aten.clone.default):
        assert gone not in targets, gone
    assert before.count(aten.arange.default) == 3 and targets.count(aten.arange.default) == 1
    assert targets.count(aten.cat.default) == before.count(aten.cat.default) - 4 * NUM_LAYERS
    assert report.nodes_after < report.nodes_before
    assert f"{NUM_LAYERS}/{NUM_LAYERS} attention cores" in report.summary()


@pytest.mark.parametrize(
    ("batch", "seq", "past"),
    [(1, 5, 0), (3, 5, 0), (1, 1, 7), (3, 1, 7), (3, 4, 7)],
    ids=["prefill-b1", "prefill-b3", "decode-b1", "decode-b3", "continue-b3"],
)
def test_lowered_graph_matches_the_original(lowered, tiny_decoder, batch, seq, past):
    graph, _ = lowered
    ids, cache = _random_step(tiny_decoder.info["decoder"], batch, seq, past, seed=batch * 100 + past)
    ref_logits, ref_present = tiny_decoder(ids, cache)
    logits, present = graph(ids, cache)
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert len(present) == len(ref_present) == 2 * NUM_LAYERS
    for a, b in zip(present, ref_present, strict=True):
        assert a.shape == b.shape == (batch, 2, past + seq, 8)
        assert (a - b).abs().max() <= 1e-5


def test_attention_without_a_cache_is_left_alone_with_a_reason(tiny_model):
    """The plain prefill capture has no cache concat: nothing matches, the graph is untouched and the
    report names each sdpa and why."""
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    graph = qcompile.capture(tiny_model, (ids,))
    before = graph.print_readable()
    result = FuseAttentionPass()(graph)
    assert not result.changed and graph.print_readable() == before
    report = graph.info["fuse_attention"]
    assert len(report.unfused) == NUM_LAYERS and not report.fused
    assert "scaled_dot_product_attention" in report.unfused[0].node
    assert "not a cache concat" in report.unfused[0].reason
    assert "left as is" in report.summary()


def test_a_mask_that_is_not_the_causal_one_is_not_fused(tiny_decoder):
    """Swap one layer's mask for an all-true one: that layer keeps its sdpa, the other is fused."""
    graph = tiny_decoder.copy()
    sdpa = next(n for n in graph.graph.nodes if n.op == "call_function" and n.target in SDPA_OPS)
    mask = sdpa.args[3]
    with graph.graph.inserting_before(sdpa):
        full = graph.graph.call_function(torch.ops.aten.ge.Scalar, (mask, 0))
    full.meta["val"] = mask.meta["val"]
    sdpa.args = (*sdpa.args[:3], full)
    report = fuse_attention(graph)
    assert len(report.fused) == 1 and len(report.unfused) == 1
    assert "not kv_pos <= q_pos" in report.unfused[0].reason


# ---- ONNX Runtime --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["fp", "w4a16-rtn"])
def fused_export(request, tiny_model, tiny_decoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("attention") / f"tiny_{request.param}_fused.onnx"
    exp = export_decoder(
        tiny_model, path, recipe=request.param, qgraph=tiny_decoder, options=ExportOptions(accuracy_level=1)
    )
    return exp, path


def _close(ort_logits: np.ndarray, ref: torch.Tensor) -> None:
    ref = ref.numpy()
    assert ort_logits.shape == ref.shape
    assert np.abs(ort_logits - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_export_matches_reference_through_the_cache(fused_export, tiny_decoder, batch):
    """Prefill (empty cache, 5 tokens), 3 decode steps feeding present back as past, then a 3-token
    continuation after the cache (S > 1 with P > 0: GroupQueryAttention's query_seqlens path)."""
    exp, path = fused_export
    assert [row["fused"] for row in exp.attention["rows"]] == [True] * NUM_LAYERS
    assert GQA_ATTENTION not in _targets(exp.qgraph)  # the returned reference is the unfused graph
    layout = tiny_decoder.info["decoder"]
    dec = OrtDecoder(path, SessionOptions(threads=1))
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 256, (batch, 5), generator=gen)
    ref_logits, ref_past = exp.qgraph(ids, layout.empty(batch))
    logits, past = dec.step(ids, dec.empty_cache(batch))
    _close(logits, ref_logits)
    for step in range(3):
        nxt = torch.from_numpy(logits[:, -1].argmax(-1))[:, None]
        ref_logits, ref_past = exp.qgraph(nxt, ref_past)
        logits, past = dec.step(nxt, past)
        _close(logits, ref_logits)
        assert past[0].shape == (batch, 2, 6 + step, 8)
        for a, b in zip(past, ref_past, strict=True):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-5, rtol=0)
    more = torch.randint(0, 256, (batch, 3), generator=gen)
    ref_logits, _ = exp.qgraph(more, ref_past)
    logits, past = dec.step(more, past)
    _close(logits, ref_logits)
    assert past[0].shape == (batch, 2, 11, 8)


def test_fused_file_has_one_attention_node_per_layer(fused_export):
    _, path = fused_export
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    nodes = list(model.graph.node)
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == NUM_LAYERS and all(n.domain == "com.microsoft" for n in gqa)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["num_heads"] == 6 and attrs["kv_num_heads"] == 2
    assert not any(n.op_type == "Expand" for n in nodes)  # no repeat_kv copies, no mask broadcast
    # the cache goes straight into GroupQueryAttention (no concat or transpose of it) …
    readers = {
        name: sorted({n.op_type for n in nodes if name in n.input})
        for name in (i.name for i in model.graph.input)
        if name.startswith("past_key_values.")
    }
    assert all(ops in (["GroupQueryAttention"], ["GroupQueryAttention", "Shape"]) for ops in readers.values())
    # … and present.* comes straight out of it
    producers = {o: n.op_type for n in nodes for o in n.output}
    assert {producers[o.name] for o in model.graph.output if o.name.startswith("present.")} == {
        "GroupQueryAttention"
    }


def test_ort_cancels_the_layout_transposes(fused_export, tmp_path):
    """GroupQueryAttention wants [B, S, H·D]: the translation's transposes meet the graph's own around
    attention and ORT's transpose optimizer cancels them; what is left are the 2 on the shared
    cos/sin of RoPE (independent of the layer count)."""
    _, path = fused_export
    optimized = tmp_path / "optimized.onnx"
    make_session(path, SessionOptions(threads=1, optimized_model_path=str(optimized)))
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count("GroupQueryAttention") == NUM_LAYERS and ops.count("Transpose") <= 2


def test_disabling_fuse_attention_keeps_the_decomposition(tiny_model, tiny_decoder, tmp_path):
    """``fuse_attention`` disabled (with the shared KV buffer, which needs GroupQueryAttention): the
    attention stays decomposed; with the buffer still on, its precondition names the way out."""
    path = tmp_path / "unfused.onnx"
    exp = export_decoder(
        tiny_model,
        path,
        recipe="fp",
        qgraph=tiny_decoder,
        instruments=[DisablePasses(["fuse_attention", "onnx.share_kv_buffer"])],
    )
    assert exp.attention is None and exp.report.disabled == ["fuse_attention", "onnx.share_kv_buffer"]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "GroupQueryAttention" not in ops and ops.count("Expand") >= 2 * NUM_LAYERS
    assert exp.report.verification["max_relative_error"] < 1e-5
    with pytest.raises(
        PassError, match=r"onnx.share_kv_buffer: requires .* disable onnx.share_kv_buffer too"
    ):
        export_decoder(tiny_model, path, qgraph=tiny_decoder, instruments=[DisablePasses(["fuse_attention"])])
