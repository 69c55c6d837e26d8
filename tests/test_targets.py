"""Targets (``qcompile.lower``) and the instruments' lowering-related behaviour: a pattern disables
equivalence passes only, a second pipeline continues the dump's numbering."""

from __future__ import annotations

import warnings

import pytest
import torch

import qcompile
from qcompile.backends.reference import ReferenceRunner
from qcompile.ir import QGraph
from qcompile.pipeline.contract import Pass, PassContext, PassResult
from qcompile.pipeline.instruments import DisablePasses, DumpIR
from qcompile.pipeline.manager import PassManager
from qcompile.pipeline.targets import TargetError, get_target
from qcompile.tools.models import tiny_llama


class _Named(Pass):
    def __init__(self, name: str, kind: str) -> None:
        super().__init__()
        self.name, self.kind = name, kind  # type: ignore[misc]

    def run(self, ir: QGraph, ctx: PassContext) -> PassResult:
        return PassResult(ir, changed=False)


@pytest.fixture(scope="module")
def quantized():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    return qcompile.quantize(model, "w8a8-rtn", example_inputs=(ids,), progress=False), ids


def test_a_pattern_disables_equivalence_passes_only():
    passes = [
        _Named("onnx.export", "lowering"),
        _Named("onnx.fuse_rotary", "equivalence"),
        _Named("onnx.verify", "analysis"),
    ]
    rule = DisablePasses(["onnx.*"])
    assert [p.name for p in passes if rule.matches(p)] == ["onnx.fuse_rotary"]
    exact = DisablePasses(["onnx.export"])
    assert [p.name for p in passes if exact.matches(p)] == ["onnx.export"]


def test_a_pattern_that_matches_nothing_is_reported(quantized):
    qm, _ = quantized
    with pytest.warns(UserWarning, match="no pass named nope.*"):
        PassManager([_Named("noop", "analysis")], [DisablePasses(["nope.*"])], use_env=False).run(qm.qgraph)


def test_lower_continues_the_dump_of_the_recipe(quantized, tmp_path, monkeypatch):
    model = tiny_llama()
    ids = quantized[1]
    monkeypatch.setenv("QCOMPILE_DUMP_DIR", str(tmp_path))
    qm = qcompile.quantize(model, "w8a8-rtn", example_inputs=(ids,), progress=False)
    runner = qcompile.lower(qm, "reference")
    reports = sorted(p.name for p in tmp_path.glob("*.report.json"))
    assert reports == [
        "01_analyze.report.json",
        "02_annotate.report.json",
        "03_quantize.report.json",
        "04_fold_qdq.report.json",
    ]
    assert isinstance(runner, ReferenceRunner) and runner.pipeline.results[0][0] == "fold_qdq"
    torch.testing.assert_close(runner(ids).logits, qm(ids).logits, rtol=0, atol=0)  # folding is exact


def test_dump_append_without_an_earlier_dump_starts_at_zero(quantized, tmp_path):
    qm, _ = quantized
    PassManager([_Named("noop", "analysis")], [DumpIR(tmp_path, append=True)], use_env=False).run(qm.qgraph)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_input.constants.txt",
        "00_input.txt",
        "01_noop.constants.txt",
        "01_noop.report.json",
        "01_noop.txt",
    ]


def test_unknown_targets_and_options_are_refused(quantized):
    with pytest.raises(TargetError, match="unknown target 'nope'"):
        get_target("nope")
    with pytest.raises(TargetError, match="target 'onnx'.*accuracy_levl"):
        qcompile.lower(quantized[0], "onnx", {"accuracy_levl": 1})
    with pytest.raises(TypeError, match="expected a QuantizedModel or a QGraph"):
        qcompile.lower(torch.nn.Linear(2, 2), "reference")


def test_lowering_leaves_the_quantized_model_alone(quantized):
    qm, ids = quantized
    before = qm.qgraph.print_readable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qcompile.lower(qm, "reference")
    assert qm.qgraph.print_readable() == before
