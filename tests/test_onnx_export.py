"""ONNX backend: export (target ``onnx``: torch.onnx + the op registry's translations), ORT parity with
the reference QGraph, the KV-cache decode loop, and what ORT actually runs (its optimized graph).

Tolerances (measured on tiny Llama, fp32, CPU EP):
- W4A16 via MatMulNBits at accuracy_level 1 (fp32 activations): logits and cache within ~4e-7 of
  the reference; asserted at 1e-5.
- W8A8 via MatMulInteger: ~1e-3 max abs on logits of magnitude ~1: an upstream ulp difference
  sometimes flips one per-token rounding; asserted as relative L2 error < 1e-2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.backends.onnx import (
    ACCURACY_LEVEL_CONFIG,
    ExportOptions,
    OrtDecoder,
    SessionOptions,
    make_session,
    matmulnbits_file_to_qdq,
    run_flat,
    set_accuracy_level,
)
from qcompile.pipeline.recipe import load_recipe
from qcompile.tools.export import export_decoder

W4A16_G32 = {
    "recipe": {"name": "w4a16-g32", "description": "tiny-model W4A16: 48 = 32 + a ragged 16"},
    "passes": [
        {"name": "analyze"},
        {"name": "annotate", "weight_bits": 4, "group_size": 32, "act_mode": "none"},
        {"name": "quantize"},
    ],
}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def w4a16_export(tiny_model, tiny_decoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny_w4a16.onnx"
    # lm_head and the tied embedding at int4 g16 on one grid: one packed table
    recipe = load_recipe(W4A16_G32).with_quantization(lm_head_bits=4, embedding_bits=4, head_group_size=16)
    exp = export_decoder(
        tiny_model, path, recipe=recipe, qgraph=tiny_decoder, options=ExportOptions(accuracy_level=1)
    )
    return exp, path


def _greedy_reference(qgraph, layout, ids: torch.Tensor, new: int) -> np.ndarray:
    logits, past = qgraph(ids, layout.empty(ids.shape[0]))
    out = [ids]
    for i in range(new):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 < new:
            logits, past = qgraph(nxt, past)
    return torch.cat(out, dim=1).numpy()


def test_w4a16_decoder_matches_reference_through_the_cache(w4a16_export, tiny_decoder):
    exp, path = w4a16_export
    layout = tiny_decoder.info["decoder"]
    dec = OrtDecoder(path)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_past = exp.qgraph(ids, layout.empty(3))  # prefill from an empty cache
    logits, past = dec.step(ids, dec.empty_cache(3))
    assert logits.shape == (3, 1, 256) and past[0].shape == (3, 2, 9, 8)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-5, rtol=0)
    for a, b in zip(past, ref_past, strict=True):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5, rtol=0)
    nxt = torch.tensor([[5], [6], [7]])
    ref_step, _ = exp.qgraph(nxt, ref_past)
    step, past2 = dec.step(nxt, past)
    assert past2[0].shape == (3, 2, 10, 8)
    np.testing.assert_allclose(step, ref_step.numpy(), atol=1e-5, rtol=0)
    assert np.array_equal(dec.generate(ids, 6), _greedy_reference(exp.qgraph, layout, ids, 6))


def test_w4a16_file_layout_and_report(w4a16_export):
    exp, path = w4a16_export
    report = exp.report
    assert report.kernels() == {"MatMulNBits": 15, "GatherBlockQuantized": 1}
    assert report.accuracy_level == 1 and report.int4_format == "matmulnbits"
    assert report.file_bytes == path.stat().st_size and report.path == str(path)
    # the file packs q/k/v and gate/up of each layer into one kernel (optimize.pack_projections):
    # 2 layers × (7 → 4) + lm_head
    assert report.op_counts["MatMulNBits"] == 9 and report.op_counts["GatherBlockQuantized"] == 1
    model = onnx.load(str(path))
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in model.graph.output][:2] == ["logits", "present.0.key"]
    dims = [d.dim_param for d in model.graph.input[1].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2] == "past_sequence"
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 1
    inits = {i.name: i for i in model.graph.initializer}
    packed = inits[nbits[0].input[1]]
    # q/k/v packed: N = 48 + 16 + 16 rows; K = 48 in 2 blocks (48 = 32 + 16), 16 bytes a block
    assert packed.data_type == onnx.TensorProto.UINT8 and list(packed.dims) == [80, 2, 16]
    # the tied lm_head (MatMulNBits) and the embedding (GatherBlockQuantized) read one packed
    # initializer: the 256 × 48 int4 table is stored once
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert list(inits[gather.input[0]].dims) == [256, 3, 8]
    assert any(n.input[1] == gather.input[0] for n in nbits)
    quantized = exp.pipeline.result("quantize").report
    assert quantized["embedding"][0]["shared_with_lm_head"]
    assert [r["scheme"] for r in quantized["linears"] if r["role"] == "lm_head"] == ["w4g16s-a16"]


def test_ort_optimized_graph_keeps_matmulnbits(w4a16_export, tmp_path):
    """What ORT runs after its own graph optimizations: every quantized linear is still MatMulNBits
    and no float MatMul appeared for them."""
    _, path = w4a16_export
    optimized = tmp_path / "optimized.onnx"
    make_session(path, SessionOptions(optimized_model_path=str(optimized)))
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count("MatMulNBits") == 9 and ops.count("GatherBlockQuantized") == 1
    assert ops.count("MatMul") <= 4  # only the attention products (2 per layer) stay float


def test_qdq_int4_format_is_fused_back_by_ort(w4a16_export, tmp_path):
    """Standard-ONNX form: DequantizeLinear(INT4, block 32, ragged 48 = 32 + 16) → MatMul; ORT's
    optimized graph has the MatMulNBits again, and the numbers are those of the MatMulNBits file."""
    _, path = w4a16_export
    qdq = tmp_path / "qdq.onnx"
    assert matmulnbits_file_to_qdq(path, qdq) == 9  # packed q/k/v and gate/up: 2 × 4 + lm_head
    model = onnx.load(str(qdq))
    onnx.checker.check_model(model)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    inits = {i.name: i for i in model.graph.initializer}
    assert len(dq) == 9 and inits[dq[0].input[0]].data_type == onnx.TensorProto.INT4
    assert not any(n.op_type == "MatMulNBits" for n in model.graph.node)
    optimized = tmp_path / "qdq_opt.onnx"
    exact = {ACCURACY_LEVEL_CONFIG: "1"}
    make_session(qdq, SessionOptions(optimized_model_path=str(optimized), extra=exact))
    assert [n.op_type for n in onnx.load(str(optimized)).graph.node].count("MatMulNBits") == 9
    ids = np.arange(14).reshape(2, 7) * 17 % 256
    a, b = OrtDecoder(path), OrtDecoder(qdq, SessionOptions(extra=exact))
    np.testing.assert_allclose(a.step(ids, a.empty_cache(2))[0], b.step(ids, b.empty_cache(2))[0], atol=1e-5)


def test_w8a8_prefill_export_uses_integer_gemm(tiny_model, tmp_path):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    qm = qcompile.quantize(tiny_model, "w8a8-rtn", example_inputs=(ids,), progress=False)
    path = tmp_path / "tiny_w8a8.onnx"
    before = qm.qgraph.print_readable()
    report = qm.export_onnx(path)  # traced on the quantized model's own sample input
    assert qm.qgraph.print_readable() == before  # lowering works on a copy
    assert report.kernels() == {"MatMulInteger": 14} and report.outputs[0][0] == "logits"
    assert [n for n in report.passes if n.startswith("onnx.")] == [
        "onnx.export",
        "onnx.pack_projections",
        "onnx.rms_norm_div",
        "onnx.fuse_skip_rms_norm",
        "onnx.collapse_reshapes",
    ]  # not a decode step: no attention fusion, no cache rewrites, no verification
    session = make_session(path)
    new = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(2))  # other batch and length
    (logits,) = run_flat(session, [new])
    ref = qm.qgraph(new).logits.numpy()
    assert logits.shape == ref.shape == (3, 11, 256)
    assert _rel(logits, ref) < 1e-2  # measured 1e-4 .. 2e-3


W4A8 = {
    "recipe": {"name": "w4a8"},
    "passes": [
        {"name": "analyze"},
        {"name": "annotate", "weight_bits": 4, "group_size": 16},
        {"name": "quantize"},
    ],
}
W4A4 = {
    "recipe": {"name": "w4a4"},
    "passes": [
        {"name": "analyze"},
        {"name": "annotate", "weight_bits": 4, "group_size": 16, "act_bits": 4},
        {"name": "quantize"},
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "tolerance"),
    # Measured: fp 2e-7, W8A8 ~1e-3, W4A8 ~1e-3, W4A4 2.9e-2. With quantized activations an ulp of
    # difference upstream can flip one rounding; a 4-bit step is absmax / 7.5, so W4A4 moves most.
    [("fp", 1e-5), ("w8a8-rtn", 1e-2), (W4A8, 1e-2), (W4A4, 6e-2)],
    ids=["fp", "w8a8", "w4a8", "w4a4"],
)
def test_decoder_parity_per_scheme(tiny_model, tiny_decoder, tmp_path, recipe, tolerance):
    path = Path(tmp_path) / "dec.onnx"
    exp = export_decoder(
        tiny_model, path, recipe=recipe, qgraph=tiny_decoder, options=ExportOptions(accuracy_level=1)
    )
    layout = tiny_decoder.info["decoder"]
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    ref, _ = exp.qgraph(ids, layout.empty(2))
    dec = OrtDecoder(path)
    logits, _ = dec.step(ids, dec.empty_cache(2))
    assert _rel(logits, ref.numpy()) < tolerance


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("recipe", ["fp", "w4a16-rtn"])
def test_smollm2_prefill_parity(smollm2_qgraph, tmp_path, recipe):
    """SmolLM2 (the captured prefill graph): ORT logits vs the reference QGraph. Measured max abs
    error 5e-5 (fp) and 9e-5 (w4a16, accuracy_level 1) on logits of magnitude ~20."""
    qg, ids = smollm2_qgraph
    qm = qcompile.quantize(qg, recipe, example_inputs=(ids,), progress=False)
    path = tmp_path / f"smollm2_{recipe}.onnx"
    report = qm.export_onnx(path, ExportOptions(accuracy_level=1))
    if recipe != "fp":
        assert report.kernels() == {"MatMulNBits": 210}
    (logits,) = run_flat(make_session(path), [ids])
    ref = qm.qgraph(ids).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=0)
    assert (logits[0, -1].argmax() == ref[0, -1].argmax()).all()


@pytest.mark.slow
def test_cli_export_onnx_writes_the_decode_step_of_a_local_model_folder(tmp_path, tiny_model, capsys):
    """A model no test names: a transformers Llama saved to a folder (config + safetensors, no
    tokenizer files), exported from the CLI by its path."""
    from qcompile.tools.cli import main

    folder = tmp_path / "my-llama"
    tiny_model.save_pretrained(folder)
    out = tmp_path / "cli.onnx"
    argv = ["export-onnx", str(folder), "--recipe", "w4a16-rtn", "--out", str(out)]
    assert main([*argv, "--lm-head-bits", "4", "--embedding-bits", "4", "--head-group-size", "16"]) == 0
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    # 2 layers × (q/k/v, gate/up packed; o; down) + the tied lm_head; its table serves the lookup
    assert ops.count("MatMulNBits") == 9 and ops.count("GatherBlockQuantized") == 1
    dec = OrtDecoder(out)
    assert dec.shared_buffer and dec.generate(np.array([[1, 2, 3]]), 3).shape == (1, 6)


@pytest.mark.slow
def test_int8_blocked_weights_and_head_export(tiny_model, tiny_decoder, tmp_path):
    """W8A16 g16 and an int8 tied head: MatMulNBits (bits 8) and GatherBlockQuantized (bits 8) on one
    blocked table; measured max abs error 1.5e-7 at accuracy level 1."""
    w8 = {
        "recipe": {"name": "w8a16-g16"},
        "passes": [
            {"name": "analyze"},
            {"name": "annotate", "weight_bits": 8, "group_size": 16, "act_mode": "none"},
            {"name": "quantize"},
        ],
    }
    path = tmp_path / "w8.onnx"
    recipe = load_recipe(w8).with_quantization(lm_head_bits=8, embedding_bits=8, head_group_size=16)
    exp = export_decoder(
        tiny_model, path, recipe=recipe, qgraph=tiny_decoder, options=ExportOptions(accuracy_level=1)
    )
    assert exp.report.kernels() == {"MatMulNBits": 15, "GatherBlockQuantized": 1}
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    ref, _ = exp.qgraph(ids, tiny_decoder.info["decoder"].empty(2))
    dec = OrtDecoder(path)
    np.testing.assert_allclose(dec.step(ids, dec.empty_cache(2))[0], ref.numpy(), atol=1e-5, rtol=0)


W4A16_ASYM_CLIP = {
    "recipe": {"name": "w4a16-asym-clip", "description": "asymmetric int4 g16 RTN with clip search"},
    "passes": [
        {"name": "analyze"},
        {
            "name": "annotate",
            "weight_bits": 4,
            "weight_symmetric": False,
            "group_size": 16,
            "clip_search": True,
            "act_mode": "none",
        },
        {"name": "calibrate"},
        {"name": "quantize"},
    ],
}


def test_asymmetric_int4_weights_reach_matmulnbits_with_zero_points(tiny_model, tiny_decoder, tmp_path):
    """Asymmetric W4A16 (the scheme of `w4a16-asym-clip`): every MatMulNBits gets its packed zero
    points, and ORT at accuracy level 1 reproduces the reference through a prefill and a cached step."""
    gen = torch.Generator().manual_seed(5)
    calibration = [torch.randint(0, 256, (1, 24), generator=gen) for _ in range(3)]
    path = tmp_path / "asym.onnx"
    exp = export_decoder(
        tiny_model,
        path,
        recipe=W4A16_ASYM_CLIP,
        qgraph=tiny_decoder,
        calibration=calibration,
        options=ExportOptions(accuracy_level=1),
    )
    proto = onnx.load(str(path))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 8 and all(len(n.input) >= 4 and n.input[3] for n in nbits)  # 2 layers × 4 packed
    layout = tiny_decoder.info["decoder"]
    ids = torch.randint(0, 256, (2, 9), generator=gen)
    ref, ref_past = exp.qgraph(ids, layout.empty(2))
    dec = OrtDecoder(path)
    logits, past = dec.step(ids, dec.empty_cache(2))
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4, rtol=0)
    nxt = torch.tensor([[3], [4]])
    ref_step, _ = exp.qgraph(nxt, ref_past)
    step, _ = dec.step(nxt, past)
    np.testing.assert_allclose(step, ref_step.numpy(), atol=1e-4, rtol=0)


def test_quantized_activations_are_not_requantized_in_kernel(tiny_model, tiny_decoder, tmp_path):
    """W4A4: MatMulNBits reading an activation the recipe quantized stays at accuracy level 1 in a
    level-4 export (level 4 would round it again, to int8 per block); the weight-only int8 lm_head
    gets level 4. ``set_accuracy_level`` moves only the weight-only ones."""
    path = tmp_path / "w4a4.onnx"
    exp = export_decoder(
        tiny_model,
        path,
        recipe=load_recipe("w4a4-rtn").with_quantization(lm_head_bits=8, head_group_size=16),
        qgraph=tiny_decoder,
        options=ExportOptions(accuracy_level=4),
    )
    assert not exp.report.verification["enforced"]  # quantized activations: reported, not enforced

    def levels(p: Path) -> dict[str, int]:
        nodes = [n for n in onnx.load(str(p)).graph.node if n.op_type == "MatMulNBits"]
        return {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nodes}

    def head_node(lv: dict[str, int]) -> str:
        (name,) = [n for n in lv if "qlinear_wa" not in n]  # the exporter names nodes after the ops
        return name

    written = levels(path)
    head = head_node(written)
    assert len(written) == 2 * 4 + 1  # per layer q/k/v and gate/up packed, o, down; plus the head
    assert written[head] == 4 and {v for n, v in written.items() if n != head} == {1}
    assert set_accuracy_level(path, tmp_path / "l1.onnx", 1) == 1
    assert set(levels(tmp_path / "l1.onnx").values()) == {1}
    assert set_accuracy_level(tmp_path / "l1.onnx", tmp_path / "l4.onnx", 4) == 1
    assert levels(tmp_path / "l4.onnx") == written


def test_the_same_recipe_writes_byte_identical_files(rope_model, rope_decoder, tmp_path):
    """Determinism: one recipe, one seed, one thread count -> the same bytes (weights, graph, names)."""
    paths = [tmp_path / f"run{i}.onnx" for i in range(2)]
    for path in paths:
        export_decoder(rope_model, path, recipe="w4a16-rtn", qgraph=rope_decoder)
    first, second = (p.read_bytes() for p in paths)
    assert len(first) > 10_000 and first == second
