"""The int8 KV cache through the ONNX backend: the quantize → dequantize pairs ``quantize`` puts on the
annotated cache entries (``annotate(kv_cache_bits = 8)``) lowered to
``qcompile::gqa_attention_int8kv`` and to ORT's ``GroupQueryAttention`` over an int8 cache.

Tolerances (tiny Llama, head_dim 16 so RoPE also moves into GroupQueryAttention; MatMulNBits at
accuracy level 1):
- the lowering in torch: present caches equal (int8, exact) and logits bit for bit against the
  unfused graph fed the dequantized past; asserted exactly / at 1e-6.
- ORT vs the reference QGraph: the same int8 cache entries (ORT quantizes with ``rint(x / s)``, the
  reference rounds half to even: the same grid) and logits within 1e-4 × their max (measured ~1e-7).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.analysis.patterns import is_op
from qcompile.backends.onnx import ExportOptions, OrtDecoder, SessionOptions
from qcompile.ops import GQA_ATTENTION_INT8KV
from qcompile.passes.fuse_attention import fuse_attention, int8_cache_scales
from qcompile.pipeline.contract import PassError
from qcompile.tools.export import export_decoder
from tests.test_quantize_kv import KV_RECIPE

NUM_LAYERS = 2
KV8_W4 = {
    "recipe": {"name": "w4-kv8", "description": "W4A16 g16 RTN with an int8 KV cache"},
    "passes": [
        {"name": "analyze"},
        {"name": "annotate", "weight_bits": 4, "group_size": 16, "act_mode": "none", "kv_cache_bits": 8},
        {"name": "quantize"},
    ],
}


def _calibration() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (1, 32), generator=gen) for _ in range(4)]


@pytest.fixture(scope="module")
def quantized(rope_decoder):
    layout = rope_decoder.info["decoder"]
    cal = [(ids, layout.empty(1)) for ids in _calibration()]
    qm = qcompile.quantize(rope_decoder, KV_RECIPE, calibration=cal, example_inputs=cal[0], progress=False)
    return qm.qgraph


@pytest.fixture(scope="module")
def exported(rope_model, rope_decoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("kv8") / "tiny_kv8.onnx"
    exp = export_decoder(
        rope_model,
        path,
        recipe=KV8_W4,
        qgraph=rope_decoder,
        calibration=_calibration(),
        options=ExportOptions(accuracy_level=1),
    )
    return exp, path


def _random_int8_cache(layout, batch: int, past: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, layout.num_kv_heads, past, layout.head_dim)
    return tuple(
        torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8) for _ in range(2 * layout.num_layers)
    )


def test_lowering_makes_the_cache_int8(quantized):
    graph = quantized.copy()
    report = fuse_attention(graph)
    assert report.int8_cache and len(report.fused) == NUM_LAYERS
    assert "int8 KV cache" in report.summary()
    fused = [n for n in graph.graph.nodes if is_op(n, {GQA_ATTENTION_INT8KV})]
    assert len(fused) == NUM_LAYERS
    past = [n for n in graph.graph.nodes if n.op == "placeholder"][1:]
    assert all(p.meta["val"].dtype == torch.int8 for p in past)
    # the quantize → dequantize pairs of the cache entries are gone with the concats they fed
    assert not any(n.target is torch.ops.qcompile.quantize.default for n in graph.graph.nodes)


@pytest.mark.parametrize(("batch", "seq", "past"), [(1, 5, 0), (2, 1, 6), (2, 3, 6)])
def test_lowered_int8_graph_matches_the_unfused_one(quantized, batch, seq, past):
    """The fused op on int8 past == the unfused graph on that past dequantized (q · scale)."""
    graph = quantized.copy()
    fuse_attention(graph)
    layout = quantized.info["decoder"]
    scales = int8_cache_scales(graph)
    names = [n.name for n in graph.graph.nodes if n.op == "placeholder"][1:]
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seq))
    cache = _random_int8_cache(layout, batch, past, seed=past)
    float_cache = tuple(q * scales[n] for q, n in zip(cache, names, strict=True))
    with torch.no_grad():
        ref_logits, ref_present = quantized(ids, float_cache)
        logits, present = graph(ids, cache)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    for q, want, old, name in zip(present, ref_present, cache, names, strict=True):
        assert q.dtype == torch.int8 and q.shape == (batch, 2, past + seq, 16)
        assert torch.equal(q[:, :, :past], old)  # the past is kept as it was
        torch.testing.assert_close(q * scales[name], want, rtol=0, atol=0)


def test_mixed_float_and_int8_layers_are_refused(quantized):
    """A decode step has one cache dtype: with layer 0's quantizers bypassed, the lowering refuses."""
    graph = quantized.copy()
    site = graph.info["structure"].attentions[0]
    for name in (site.key_source, site.value_source):
        node = graph.node(name)
        (q,) = node.users
        (dq,) = q.users
        dq.replace_all_uses_with(node)
    with pytest.raises(PassError, match="some layers' KV cache is int8 and others' float"):
        fuse_attention(graph)


def test_int8_cache_file_layout(exported):
    exp, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    past = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    present = [o for o in model.graph.output if o.name.startswith("present.")]
    assert len(past) == len(present) == 2 * NUM_LAYERS
    assert {i.type.tensor_type.elem_type for i in past + present} == {onnx.TensorProto.INT8}
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == NUM_LAYERS
    for node in gqa:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL"
        assert attrs["kv_cache_bit_width"] == 8 and attrs["do_rotary"] == 1  # RoPE moved in as well
        assert node.input[12] and node.input[13]  # k_scale, v_scale
    assert exp.report.passes["onnx.export"]["int8_cache"]
    assert exp.report.verification is not None and not exp.report.verification["enforced"]


def test_ort_int8_cache_matches_the_reference_through_the_cache(exported, rope_decoder):
    """Prefill, three in-place decode steps and a multi-token continuation: ORT's int8 cache holds the
    reference's grid values and its logits match."""
    exp, path = exported
    layout = rope_decoder.info["decoder"]
    graph = exp.qgraph.copy()
    fuse_attention(graph)
    scales = int8_cache_scales(graph)
    names = [n.name for n in graph.graph.nodes if n.op == "placeholder"][1:]
    dec = OrtDecoder(path, SessionOptions(threads=1))
    assert dec.dtype == np.int8 and dec.shared_buffer
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 5), generator=gen)
    cache = dec.new_cache(2, 16)
    ref_logits, ref_past = exp.qgraph(ids, layout.empty(2))
    logits = dec.step_inplace(ids, cache)
    for _ in range(3):
        _close(logits, ref_logits)
        nxt = torch.from_numpy(logits[:, -1].argmax(-1))[:, None]
        ref_logits, ref_past = exp.qgraph(nxt, ref_past)
        logits = dec.step_inplace(nxt, cache)
    _close(logits, ref_logits)
    for q, want, name in zip(cache.numpy(), ref_past, names, strict=True):
        np.testing.assert_array_equal(q * scales[name].numpy(), want.numpy())
    more = torch.randint(0, 256, (2, 3), generator=gen)
    ref_logits, _ = exp.qgraph(more, ref_past)
    _close(dec.step_inplace(more, cache), ref_logits)


def test_generate_with_an_int8_cache_equals_the_functional_loop(exported):
    _, path = exported
    dec = OrtDecoder(path, SessionOptions(threads=1))
    ids = np.random.default_rng(0).integers(0, 256, (2, 4))
    tokens = dec.generate(ids, 6)
    past, logits = dec.empty_cache(2), None
    seq = ids
    for _ in range(6):
        logits, past = dec.step(seq if logits is None else seq[:, -1:], past)
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    assert past[0].dtype == np.int8
    np.testing.assert_array_equal(tokens, seq)


def _close(ort_logits: np.ndarray, ref: torch.Tensor) -> None:
    ref = ref.numpy()
    assert ort_logits.shape == ref.shape
    assert np.abs(ort_logits - ref).max() <= 1e-4 * np.abs(ref).max()


def test_cli_kv_cache_bits_annotates_an_int8_cache(tmp_path):
    from qcompile.tools.cli import main

    out = tmp_path / "cli_kv8.onnx"
    argv = ["export-onnx", "tiny-llama", "--recipe", "w4a16-rtn", "--out", str(out), "--calib", "4x64"]
    assert main([*argv, "--kv-cache-bits", "8"]) == 0
    dec = OrtDecoder(out)
    assert dec.dtype == np.int8
    gqa = [n for n in onnx.load(str(out)).graph.node if n.op_type == "GroupQueryAttention"]
    assert all(
        onnx.helper.get_attribute_value(a) == 8
        for n in gqa
        for a in n.attribute
        if a.name == "kv_cache_bit_width"
    )
