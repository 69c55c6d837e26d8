"""Lowering to ONNX is part of the pipeline: target ``onnx``'s passes run under the pass manager, so
the dump, the equivalence check, the IR verifier and the disable mechanism see every one of them;
the model stays in memory until the one write; the op registry holds the ONNX translations."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.backends.onnx import REWRITES, ExportOptions, OnnxModel, OrtDecoder
from qcompile.backends.onnx.graph_edit import Matcher
from qcompile.backends.onnx.rewrite import OnnxRewrite
from qcompile.backends.onnx.target import ONNX_TARGET
from qcompile.errors import PassError
from qcompile.frontend.decoder import example_decoder_inputs
from qcompile.ir import keys
from qcompile.ops.registry import OPS, coverage_table, missing
from qcompile.pipeline.instruments import DisablePasses, EquivalenceCheck, StopAfter
from qcompile.pipeline.manager import PassManager
from qcompile.tools.export import export_decoder, quantize_decoder
from tests.test_onnx_export import W4A16_G32

LOWERING = ["keep_reference", "fuse_attention", "fold_qdq", "onnx.export", *REWRITES, "onnx.verify"]


@pytest.fixture(scope="module")
def dumped(rope_model, rope_decoder, tmp_path_factory):
    """One export with ``QCOMPILE_DUMP_DIR`` set and every rewrite checked by ``EquivalenceCheck``,
    counting every ONNX file written or read on the way."""
    dump = tmp_path_factory.mktemp("dump")
    path = dump.parent / "dumped.onnx"
    check = EquivalenceCheck()
    io = {"save": 0, "load": 0}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QCOMPILE_DUMP_DIR", str(dump))
        for name, fn in (("save", onnx.save_model), ("load", onnx.load_model)):
            mp.setattr(
                onnx,
                f"{name}_model",
                lambda *a, _fn=fn, _n=name, **k: (io.__setitem__(_n, io[_n] + 1), _fn(*a, **k))[1],
            )
        exp = export_decoder(rope_model, path, recipe=W4A16_G32, qgraph=rope_decoder, instruments=[check])
    return exp, path, dump, check, io


def test_an_export_dumps_every_pass_numbered(dumped):
    exp, _, dump, _, _ = dumped
    stems = sorted(p.name.removesuffix(".report.json") for p in dump.glob("*.report.json"))
    expected = [
        f"{i:02d}_{name}" for i, name in enumerate(["analyze", "annotate", "quantize", *LOWERING], start=1)
    ]
    assert stems == expected and (dump / "00_input.txt").exists()
    for stem in expected:
        assert (dump / f"{stem}.txt").exists() and (dump / f"{stem}.constants.txt").exists()
        assert json.loads((dump / f"{stem}.report.json").read_text())["pass"] == stem.split("_", 1)[1]
    # the ONNX dumps list names, shapes and attributes, never weights: the text is far smaller than
    # the model, and its constants file has one line per initializer
    text = (dump / next(f"{s}.txt" for s in expected if s.endswith("_onnx.export"))).read_text()
    assert "MatMulNBits" in text and "GroupQueryAttention" in text
    model = onnx.load(str(dumped[1]))
    assert len(text) < model.ByteSize() / 2
    constants = (dump / f"{expected[-1]}.constants.txt").read_text().splitlines()
    assert len(constants) == len(model.graph.initializer)
    assert exp.report.passes == {name: r.report for name, r in exp.pipeline.results}


def test_only_the_final_model_is_written(dumped):
    """The ModelProto stays in memory through every rewrite and the verification: one write, no read."""
    _, path, _, _, io = dumped
    assert io == {"save": 1, "load": 0}
    assert path.exists()


def test_every_rewrite_is_checked_against_the_model_before_it(dumped):
    exp, _, _, check, _ = dumped
    assert [r.pass_name for r in check.records] == list(REWRITES)
    for record in check.records:
        assert record.passed and record.max_error <= record.tolerance
        assert exp.report.passes[record.pass_name]["equivalence_check"]["max_error"] == record.max_error
    exact = {
        "onnx.share_kv_buffer",
        "onnx.pack_projections",
        "onnx.pack_qkv_into_gqa",
        "onnx.collapse_reshapes",
    }
    assert all(r.max_error == 0 for r in check.records if r.pass_name in exact)


class _SwapRopeHalves(OnnxRewrite):
    """A faulty rewrite: layer 0's rotate_half concatenates its halves the other way round."""

    name = "test.swap_rope_halves"
    tolerance = 1e-6

    def rewrite(self, model):
        g = Matcher(model.graph)
        cat = next(
            n
            for n in model.graph.node
            if n.op_type == "Concat"
            and g.producer.get(n.input[0]) is not None
            and g.producer[n.input[0]].op_type == "Neg"
        )
        cat.input[0], cat.input[1] = cat.input[1], cat.input[0]
        return {"count": 1}


@pytest.fixture(scope="module")
def exported(rope_decoder):
    """The tiny decode step right after ``onnx.export`` (no rewrite yet), and its quantized graph."""
    quantized = quantize_decoder(rope_decoder, W4A16_G32)
    artifact = qcompile.lower(
        quantized, "onnx", {"max_positions": 64}, instruments=[StopAfter("onnx.export")]
    )
    return artifact.model, quantized


def _rewrites(disabled: list[str], model: OnnxModel):
    passes = [p for p in ONNX_TARGET.passes({"max_positions": 64}, True) if p.name in REWRITES]
    return PassManager(passes, [DisablePasses(disabled)]).run(model)


def test_a_faulty_rewrite_is_caught_by_the_equivalence_check(exported):
    model, quantized = exported
    sample = example_decoder_inputs(quantized.info[keys.INFO_DECODER], batch=2, past=4, seq=3)
    with pytest.raises(
        PassError, match=r"test.swap_rope_halves: changed the outputs by .* over its tolerance"
    ):
        PassManager([_SwapRopeHalves()], [EquivalenceCheck([sample])]).run(model)


# What each rewrite does, seen in the final model; and the rewrites whose effect builds on it.
EFFECTS = {
    "onnx.share_kv_buffer": (lambda m: "past_sequence_length" in m.input_names, set()),
    "onnx.pack_projections": (lambda m: m.op_counts().get("MatMulNBits") < 14, {"onnx.pack_qkv_into_gqa"}),
    "onnx.fuse_rotary": (lambda m: "Cos" not in m.op_counts(), {"onnx.pack_qkv_into_gqa"}),
    "onnx.rms_norm_div": (lambda m: "Reciprocal" not in m.op_counts(), {"onnx.fuse_skip_rms_norm"}),
}


@pytest.mark.parametrize("name", list(EFFECTS))
def test_disabling_one_rewrite_removes_exactly_its_effect(exported, name):
    model, _ = exported
    before = model.print_readable()
    full, without = _rewrites([], model), _rewrites([name], model)
    effect, dependents = EFFECTS[name]
    assert effect(full.ir) and not effect(without.ir)
    assert without.disabled == [name] and name not in dict(without.results)
    counts = {n: r.report["count"] for n, r in full.results}
    kept = {n: r.report["count"] for n, r in without.results}
    assert {n: c for n, c in kept.items() if n not in dependents} == {
        n: c for n, c in counts.items() if n not in dependents | {name}
    }
    assert all(kept[n] == 0 for n in dependents)
    assert model.print_readable() == before  # the pipelines worked on copies


def test_disabling_every_rewrite_by_pattern_keeps_export_and_verification(rope_model, rope_decoder, tmp_path):
    exp = export_decoder(
        rope_model,
        tmp_path / "plain.onnx",
        recipe=W4A16_G32,
        qgraph=rope_decoder,
        instruments=[DisablePasses(["onnx.*"])],
    )
    assert exp.report.disabled == list(REWRITES)
    assert "onnx.export" in exp.report.passes and exp.report.verification["max_relative_error"] < 1e-5
    assert not OrtDecoder(tmp_path / "plain.onnx").shared_buffer


def test_cli_disable_pass_and_dump_dir(tmp_path, capsys):
    from qcompile.tools.cli import main

    out, dump = tmp_path / "cli.onnx", tmp_path / "dump"
    argv = ["export-onnx", "tiny-llama", "--recipe", "w4a16-rtn", "--out", str(out), "--dump-dir", str(dump)]
    assert (
        main([*argv, "--disable-pass", "onnx.share_kv_buffer", "--disable-pass", "onnx.collapse_reshapes"])
        == 0
    )
    assert not OrtDecoder(out).shared_buffer  # exactly that rewrite is missing from the file …
    assert any(n.op_type == "GroupQueryAttention" for n in onnx.load(str(out)).graph.node)
    names = sorted(p.name.removesuffix(".report.json") for p in dump.glob("*.report.json"))
    assert [n.split("_", 1)[1] for n in names] == [  # … and from the numbered dump
        "analyze",
        "annotate",
        "quantize",
        *[n for n in LOWERING if n not in ("onnx.share_kv_buffer", "onnx.collapse_reshapes")],
    ]
    assert names[0].startswith("01_") and names[-1].startswith(f"{len(names):02d}_")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recipe", "no-such-recipe"], "no shipped recipe or file named 'no-such-recipe'"),
        (["--disable-pass", "onnx.nope"], "--disable-pass 'onnx.nope' matches no pass of this export"),
        (["--calib", "32"], "--calib '32': give windows x tokens"),
        (["--prefill-only", "--disable-pass", "onnx.fuse_rotary"], "matches no pass of this export"),
        (["./no/such/model"], "not a packaged model (smollm2, tiny-llama) and not a local model folder"),
        (["pyproject.toml"], "pyproject.toml is a file but not a .gguf model"),
    ],
)
def test_cli_user_errors_are_one_line_before_loading_a_model(extra, message, capsys, monkeypatch):
    from qcompile.tools import cli, models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_smollm2", no_model)
    assert cli.main(["export-onnx", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_every_op_has_an_onnx_translation():
    assert missing("onnx") == []
    lines = coverage_table().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == len(OPS)
    assert all(row[header.index("onnx")] == "yes" for row in rows)


def test_onnx_model_ir_protocol(exported):
    model, _ = exported
    copy = model.copy()
    copy.graph.node[0].input[0] = "nowhere"
    assert model.graph.node[0].input[0] != "nowhere"  # a deep copy
    assert model.verify() == [] and "nowhere" in copy.verify()[0]
    text = model.print_readable()
    assert len(text.splitlines()) == 1 + len(model.graph.input) + len(model.graph.output) + len(
        model.graph.node
    )
    sample = example_decoder_inputs(exported[1].info[keys.INFO_DECODER], batch=2, past=4, seq=3)
    logits, *present = model.run_flat(model.flatten_inputs(sample))
    ref_logits, ref_present = exported[1](*sample)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert len(present) == len(ref_present) and present[0].shape == (2, 2, 7, 16)
    assert np.isfinite(logits.numpy()).all()


def test_export_options_are_data_not_flags():
    """The rewrites are passes, not options: ExportOptions has none of the old switches."""
    fields = set(ExportOptions.__dataclass_fields__)
    assert not fields & {"pack_projections", "rms_norm_div", "share_kv_buffer", "fuse_rotary", "verify"}
    names = [p.name for p in ONNX_TARGET.passes(ExportOptions(int4_format="qdq"), decode_step=True)]
    assert names == [*LOWERING[:-1], "onnx.qdq_format", "onnx.verify"]


def test_qdq_format_pass_is_checked_and_verified(exported):
    """``int4_format = "qdq"``: the pass rewrites every MatMulNBits into DequantizeLinear(INT4) → MatMul,
    the equivalence check runs it at the same accuracy level as before, and onnx.verify (ORT's fused
    kernel at session-config level 1) still matches the reference."""
    from qcompile.backends.onnx.qdq_format import QDQFormatPass
    from qcompile.backends.onnx.verify import VerifyPass
    from qcompile.pipeline.contract import PassContext

    model, quantized = exported
    sample = example_decoder_inputs(quantized.info[keys.INFO_DECODER], batch=2, past=4, seq=3)
    ctx = PassContext(sample_inputs=[sample], state={keys.STATE_REFERENCE: quantized})
    check = EquivalenceCheck()
    result = PassManager([QDQFormatPass(), VerifyPass()], [check]).run(model, ctx)
    assert result.ir.int4_format == "qdq" and "MatMulNBits" not in result.ir.op_counts()
    assert result.result("onnx.qdq_format").report["count"] == 14 and check.records[0].passed
    assert result.result("onnx.verify").report["max_relative_error"] < 1e-5


def test_the_shortest_command_plans_the_recommended_file():
    """``qcompile export-onnx`` alone: the recommended recipe with an int8 lm_head and tied embedding;
    ``0`` keeps either float; a recipe that quantizes nothing gets no head quantization."""
    from qcompile.tools.export import DEFAULT_RECIPE, ExportCommand, plan_export

    plan = plan_export(ExportCommand())
    assert plan.recipe.name == DEFAULT_RECIPE + "+lm_head8+emb8"
    annotate = next(p for p in plan.passes if p.name == "annotate").options
    assert annotate.kv_cache_bits == 8 and annotate.embedding_bits == 8
    assert [(o.roles, o.weight_bits) for o in annotate.overrides] == [(["lm_head"], 8)]
    floats = plan_export(ExportCommand(recipe="w4a16-rtn", lm_head_bits=0, embedding_bits=0))
    assert floats.recipe.name == "w4a16-rtn"
    assert plan_export(ExportCommand(recipe="fp")).recipe.name == "fp"
